"""Hard prompt and in-context examples: fixed real tokens before the input. Nothing is trained.

Trainable: 0. A bank holds K prompts of equal length ([K, n_tokens] buffer). Position policy
"shift" (default: the prompt takes positions 0..L-1 as real text does, content moves by L) or "keep".
`in_context` is a hard prompt built from k solved examples of a task (input ++ output, concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ctxtune.errors import ConfigError
from ctxtune.limits import check_int64
from ctxtune.methods.base import Method, MethodConfig, Prepared, check_position_policy
from ctxtune.methods.registry import register_method
from ctxtune.methods.splice import splice, splice_offset
from ctxtune.model.gpt import GPT


@dataclass(frozen=True)
class HardPromptConfig(MethodConfig):
    tokens: tuple[int, ...] = (0,)
    position_policy: str = "shift"

    def __post_init__(self) -> None:
        check_position_policy(self.position_policy)
        tokens = self.tokens
        if not isinstance(tokens, (tuple, list)) or len(tokens) == 0:
            raise ConfigError(f"hard prompt needs a non-empty list of token ids, got {tokens!r}")
        bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise ConfigError(f"hard prompt token ids must be integers >= 0, got {bad[:5]!r}")
        for t in tokens:
            check_int64(t, "hard prompt token id")


@register_method
class HardPrompt(Method):
    key = "hard_prompt"
    config_cls = HardPromptConfig
    config: HardPromptConfig

    def __init__(self, model: GPT, config: HardPromptConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        ids = torch.tensor(config.tokens, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
            raise ConfigError(
                f"hard prompt token ids must be in [0, {model.cfg.d_vocab - 1}], got {list(config.tokens)}"
            )
        self.register_buffer(
            "prompt_tokens", ids.expand(n_adapters, -1).clone().to(self.factory["device"])
        )  # [K, n_tokens]

    def set_prompt(self, k: int, tokens: torch.Tensor) -> None:
        """Give adapter k its own prompt (same length as the others)."""
        self.prompt_tokens[k] = tokens

    def expected_num_trainable(self) -> int:
        return 0

    def prepare(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None, n_prompt: int) -> Prepared:
        prompt = self.select(self.prompt_tokens, adapter_ids)  # [batch or 1, n_tokens]
        return splice(self.model, tokens, self.model.embed_tokens(prompt), 0, self.config.position_policy)

    def content_offset(self, index: int, n_prompt: int) -> int:
        return splice_offset(self.config.position_policy, index, 0, self.prompt_tokens.shape[1])

    @classmethod
    def positions_added(cls, config: HardPromptConfig) -> int:  # type: ignore[override]
        return len(config.tokens) if config.position_policy == "shift" else 0


@dataclass(frozen=True)
class InContextConfig(HardPromptConfig):
    """tokens: the demonstrations, already encoded (see `make_in_context`)."""


@register_method
class InContext(HardPrompt):
    """Option `examples` (default 2): the prompt is built from that many solved examples of the first task."""

    key = "in_context"
    config_cls = InContextConfig

    @classmethod
    def resolve_options(cls, options: dict[str, Any], tasks: list[Any], seed: int) -> dict[str, Any]:
        out = dict(options)
        examples = out.pop("examples", None)
        if "tokens" not in out:
            if not tasks:
                raise ConfigError("in_context needs a task to draw its solved examples from")
            out["tokens"] = list(in_context_tokens(tasks[0], 2 if examples is None else examples, seed=seed))
        elif examples is not None:
            raise ConfigError("in_context: give either tokens or examples, not both")
        return out


def in_context_tokens(task: object, n_examples: int, seed: int = 0) -> tuple[int, ...]:
    """Encode n_examples solved training examples of `task` (input ++ output each) as one prompt."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ConfigError(f"in-context examples must be at least 1, got {n_examples}")
    gen = torch.Generator().manual_seed(seed)
    batch = task.make_batch(n_examples, gen, split="train")  # type: ignore[attr-defined]
    return tuple(int(t) for t in batch.tokens.reshape(-1))  # [n_examples * seq]
