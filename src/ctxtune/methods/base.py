"""The method interface: how an adaptation method acts on a frozen GPT.

A method owns its behaviour through the model's generic entry points (input embeddings, per-layer
`LayerPrefix`, swappable `Linear` layers, explicit position ids). The trainer only sees
`trainable_parameters()`, `forward()` and the adapter state.

Alignment contract: `forward(tokens)` returns logits aligned with `tokens` ([batch, seq, d_vocab],
row i predicts token i + 1), whatever the method inserted into the sequence. `n_prompt` (the number
of leading prompt tokens) tells a suffix where to go.

Adapter banks: a method holds `n_adapters` (K) independent adapters in tensors with a leading K axis;
`adapter_ids` [batch] routes each example to its adapter on the shared frozen base. Every trainable
tensor has the K axis first, so per-adapter gradient clipping and AdamW (elementwise) make a bank
update exactly like K separate runs.

Position policy (context methods): "keep" leaves content at the positions it has without the method
(0..T-1) and gives virtual tokens no position; "shift" numbers virtual tokens as ordinary positions,
moving the content after them by n_virtual (the authors' and PEFT's convention).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ctxtune.configs import strict_from_dict
from ctxtune.errors import CheckpointError, ConfigError
from ctxtune.model.gpt import GPT, LayerPrefix

POSITION_POLICIES = ("keep", "shift")


@dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs: frozen, validated, JSON-serialisable."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], method: str = "") -> MethodConfig:
        """Build from a mapping, rejecting unknown options and wrongly typed values by name."""
        return strict_from_dict(cls, data, method or cls.__name__)


@dataclass(frozen=True)
class Prepared:
    """What a method feeds to the model for a batch of token sequences."""

    tokens: torch.Tensor | None  # [batch, seq'] or None when embeds are given
    embeds: torch.Tensor | None  # [batch, seq', d_model]
    position_ids: torch.Tensor  # [batch, seq']
    prefix: list[LayerPrefix | None] | None
    out_index: torch.Tensor  # [seq] positions of seq' whose logits align with the original tokens


class Method(nn.Module, ABC):
    """An adaptation method attached to a GPT. Subclasses set `key` and `config_cls`.

    Method facts (class attributes; code outside `methods/` reads these instead of testing keys):
        supports_bank: K adapters can train in one batch.
        saves: "adapter" (adapter.safetensors next to a base run) or "model" (model.safetensors: the
            whole model changes, so the run is itself a base).
        identity: what the paper's Section 4 identity says about the method: "holds" (virtual keys/values
            before the content: relative content attention is only rescaled and the bias lies in the span of
            fixed values, so the identity checks apply), "partial" (virtual tokens after the input: relative
            attention holds, the fixed-bias argument does not) or "none" (weights change: it does not apply).
        train_defaults: TrainConfig values a run of this method starts from (flags and specs override).
        peft_type: the Hugging Face PEFT adapter type with the same computation ("PREFIX_TUNING",
            "PROMPT_TUNING"), or None when PEFT has no prompt-learning counterpart (`ctxtune export peft`).
    """

    key: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    supports_bank: ClassVar[bool] = True
    saves: ClassVar[str] = "adapter"
    identity: ClassVar[str] = "holds"
    train_defaults: ClassVar[dict[str, Any]] = {"weight_decay": 0.01}
    peft_type: ClassVar[str | None] = None

    def __init__(self, model: GPT, config: MethodConfig, n_adapters: int = 1) -> None:
        super().__init__()
        if n_adapters < 1:
            raise ConfigError(f"n_adapters must be at least 1, got {n_adapters}")
        if n_adapters > 1 and not self.supports_bank:
            raise ConfigError(f"method {self.key!r} does not support adapter banks (n_adapters={n_adapters})")
        self.config = config
        self.n_adapters = n_adapters
        object.__setattr__(self, "model", model)  # not a submodule: base weights are not the method's
        self._frozen_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        first = next(model.parameters())
        self.factory = {"device": first.device, "dtype": first.dtype}  # adapters live with the base
        for p in model.parameters():
            p.requires_grad_(False)

    # ----- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def expected_num_trainable(self) -> int:
        """Closed-form trainable parameter count (whole bank)."""

    def prepare(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None, n_prompt: int) -> Prepared:
        """Default: tokens unchanged at positions 0..seq-1 (weight-based methods)."""
        batch, seq = tokens.shape
        positions = self.model.default_position_ids(batch, seq, 0, tokens.device)
        return Prepared(tokens, None, positions, None, torch.arange(seq, device=tokens.device))

    def content_offset(self, index: int, n_prompt: int) -> int:
        """Position-id offset of the original token at `index` (used when generating)."""
        return 0

    @classmethod
    def positions_added(cls, config: MethodConfig) -> int:
        """How many position ids a method with `config` adds to a sequence (0 when its virtual tokens take no
        position): the one definition the n_ctx checks and generation use."""
        return 0

    @classmethod
    def has_position_policy(cls) -> bool:
        """Whether the method's config has a `position_policy` option ("keep" or "shift")."""
        return "position_policy" in {f.name for f in fields(cls.config_cls)}

    @classmethod
    def resolve_options(cls, options: dict[str, Any], tasks: list[Any], seed: int) -> dict[str, Any]:
        """Options completed from the run's tasks and seed before the config is built (default: as given)."""
        return dict(options)

    def init_adapter(self, k: int, generator: torch.Generator) -> None:  # noqa: B027 - optional hook
        """(Re)initialise adapter k from `generator` (methods without parameters do nothing)."""

    # ----- shared behaviour --------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Unique tensors with requires_grad (tied tensors counted once)."""
        seen: dict[int, nn.Parameter] = {}
        for p in self.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def routing(self, adapter_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Validated adapter ids [batch] (None means adapter 0 for every example)."""
        if adapter_ids is None:
            if self.n_adapters > 1:
                raise ValueError("a bank of several adapters needs adapter_ids")
            return None
        if adapter_ids.shape != (batch,):
            raise ValueError(f"adapter_ids must have shape [{batch}], got {list(adapter_ids.shape)}")
        if adapter_ids.is_cpu and (int(adapter_ids.min()) < 0 or int(adapter_ids.max()) >= self.n_adapters):
            raise ValueError(f"adapter id out of range for a bank of {self.n_adapters}")
        return adapter_ids

    def select(self, param: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Per-example slice of a bank tensor: [K, ...] -> [batch or 1, ...]."""
        return param[:1] if ids is None else param[ids]

    def forward(
        self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None = None, n_prompt: int | None = None
    ) -> torch.Tensor:
        """Logits aligned with `tokens`: [batch, seq, d_vocab]."""
        ids = self.routing(adapter_ids, tokens.shape[0])
        prep = self.prepare(tokens, ids, tokens.shape[1] if n_prompt is None else n_prompt)
        with self.active(ids):
            logits = self.model(prep.tokens, embeds=prep.embeds, position_ids=prep.position_ids, prefix=prep.prefix)
        return logits[:, prep.out_index]  # [batch, seq, d_vocab]

    def active(self, ids: torch.Tensor | None) -> Any:
        """Context in which swapped-in modules know the routing (LoRA overrides)."""
        from contextlib import nullcontext

        return nullcontext()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding with a KV cache: [batch, n_prompt] -> [batch, n_new] new tokens."""
        batch, n_prompt = prompt.shape
        ids = self.routing(adapter_ids, batch)
        prep = self.prepare(prompt, ids, n_prompt)
        cache = self.model.new_cache()
        out = []
        with self.active(ids):
            logits = self.model(
                prep.tokens, embeds=prep.embeds, position_ids=prep.position_ids, prefix=prep.prefix, cache=cache
            )
            nxt = logits[:, -1].argmax(-1)  # [batch]
            for j in range(n_new):
                out.append(nxt)
                if j == n_new - 1:
                    break
                index = n_prompt + j
                pos = torch.full((batch, 1), index + self.content_offset(index, n_prompt), device=prompt.device)
                logits = self.model(nxt[:, None], position_ids=pos, prefix=prep.prefix, cache=cache)
                nxt = logits[:, -1].argmax(-1)
        return torch.stack(out, dim=1)  # [batch, n_new]

    def detach(self) -> None:
        """Remove the method from the model and restore the base exactly (weights and requires_grad)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._frozen_flags.get(name, True))

    # ----- state ---------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define the adapters (what a checkpoint stores)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
        """Load adapter tensors read back from a file, refusing any that do not fit this method.

        Args:
            state: name -> tensor, as `adapter_state()` gives (a `ctxtune.io.TensorFile` names its file).
            source: the file they came from, for messages (default: the TensorFile's path).

        Raises:
            ConfigError: missing or unexpected tensor names, or a tensor of another shape.
            CheckpointError: a tensor of another dtype (e.g. int64) or with NaN or infinite values.
        """
        source = source if source is not None else getattr(state, "path", None)
        where = f" in {source}" if source is not None else ""
        own = self.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ConfigError(
                f"adapter state{where} does not match method {self.key!r}: missing {missing}, unexpected {extra}"
            )
        for name, tensor in state.items():
            if tensor.shape != own[name].shape:
                raise ConfigError(
                    f"adapter tensor {name!r}{where} has shape {list(tensor.shape)}, expected {list(own[name].shape)}"
                    " (checkpoint of another model or method shape)"
                )
            check_tensor_values(name, tensor, own[name].dtype, where)
        self.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.key,
            "config": self.config.to_dict(),
            "n_adapters": self.n_adapters,
            "trainable": self.num_trainable(),
            "expected_trainable": self.expected_num_trainable(),
        }


def check_tensor_values(name: str, tensor: torch.Tensor, dtype: torch.dtype, where: str = "") -> None:
    """Refuse a tensor read back from a file whose dtype is not `dtype` or that holds NaN or infinity.

    Floating tensors of another float dtype are accepted (loading casts them); integer buffers (hard
    prompt token ids) must be integers.
    """
    same_kind = tensor.is_floating_point() == dtype.is_floating_point and (tensor.dtype == torch.bool) == (
        dtype == torch.bool
    )
    if not same_kind or tensor.is_complex():
        shown, wanted = (str(t).removeprefix("torch.") for t in (tensor.dtype, dtype))
        raise CheckpointError(f"tensor {name!r}{where} has dtype {shown}, expected {wanted}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"tensor {name!r}{where} holds NaN or infinite values")


def check_position_policy(policy: str) -> None:
    if policy not in POSITION_POLICIES:
        raise ConfigError(f"position_policy must be one of {', '.join(POSITION_POLICIES)}, got {policy!r}")


def check_n_virtual(n_virtual: int) -> None:
    if not isinstance(n_virtual, int) or n_virtual < 1:
        raise ConfigError(f"n_virtual (prefix/prompt length) must be a positive integer, got {n_virtual!r}")
