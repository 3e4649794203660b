"""LoRA (Hu et al. 2021): W x + (alpha / r) B A x on selected linear layers, every block.

Targets (roles of a block's linear maps, `model.linear_sites`): q, k, v, o (attention projections), mlp_in,
mlp_out, and mlp_gate on gated MLPs (Llama). A: [r, d_in] kaiming-uniform (as an nn.Linear default),
B: [d_out, r] zeros, so the adapted model equals the base at initialisation.
Trainable: K * n_layers * sum over targets of r * (d_in + d_out), with d_out of k and v = n_kv_heads * d_head
(grouped-query attention). Acts on weights, not the context.
Bank: A [K, r, d_in], B [K, d_out, r]; each example uses its adapter's A and B.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctxtune.errors import ConfigError
from ctxtune.limits import check_int64, is_finite_number
from ctxtune.methods.base import Method, MethodConfig
from ctxtune.methods.registry import register_method
from ctxtune.model.gpt import GPT

LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear map: torch's Linear, or the transposed Conv1D of Hugging Face's GPT-2."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores [d_in, d_out]
    return int(d_in), int(d_out)


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    rank: int = 1
    alpha: float = 1.0
    targets: tuple[str, ...] = ("o", "mlp_in", "mlp_out")  # the paper's Section 6 placement

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        check_int64(self.rank, "lora.rank")
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        targets = self.targets
        if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"LoRA targets must be a list of names from {', '.join(LORA_TARGETS)}, got {targets!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ConfigError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(LORA_TARGETS)}")
        repeated = sorted({t for t in targets if list(targets).count(t) > 1})
        if repeated:
            raise ConfigError(f"LoRA target(s) {', '.join(repeated)} given more than once")


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear; A and B live in the method (not registered here)."""

    def __init__(self, base: nn.Module, owner: LoRA, name: str) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "owner", owner)
        self.lora_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        A, B = self.owner.A[self.lora_name], self.owner.B[self.lora_name]  # [K, r, d_in], [K, d_out, r]
        ids = self.owner.current_ids
        scale = self.owner.config.alpha / self.owner.config.rank
        if ids is None:
            return out + scale * (x @ A[0].T) @ B[0].T
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, pos, d_in]
        low = torch.bmm(flat, A[ids].transpose(1, 2))  # [batch, pos, r]
        delta = torch.bmm(low, B[ids].transpose(1, 2))  # [batch, pos, d_out]
        return out + scale * delta.reshape(out.shape)


@register_method
class LoRA(Method):
    key = "lora"
    config_cls = LoRAConfig
    identity = "none"
    config: LoRAConfig

    def __init__(self, model: GPT, config: LoRAConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.current_ids: torch.Tensor | None = None
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        for layer in range(model.cfg.n_layers):
            sites = model.linear_sites(layer)
            for target in config.targets:
                if target not in sites:
                    raise ConfigError(
                        f"LoRA target {target!r} does not exist on this model; it has {', '.join(sites)}"
                    )
                parent, attr = sites[target]
                base: nn.Module = getattr(parent, attr)
                d_in, d_out = linear_dims(base)
                if config.rank > min(d_in, d_out):
                    raise ConfigError(
                        f"LoRA rank {config.rank} exceeds the width of {target} ({d_out}x{d_in}); "
                        f"use rank <= {min(d_in, d_out)}"
                    )
                name = f"{layer}_{target}"
                self.A[name] = nn.Parameter(torch.zeros(n_adapters, config.rank, d_in, **self.factory))
                self.B[name] = nn.Parameter(torch.zeros(n_adapters, d_out, config.rank, **self.factory))
                self._originals.append((parent, attr, base))
                setattr(parent, attr, LoRALinear(base, self, name))
        gen = torch.Generator().manual_seed(0)
        for k in range(n_adapters):
            self.init_adapter(k, gen)

    def init_adapter(self, k: int, generator: torch.Generator) -> None:
        with torch.no_grad():
            for name, A in self.A.items():
                bound = 1.0 / math.sqrt(A.shape[2])  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in))
                u = torch.rand(A.shape[1:], generator=generator, dtype=torch.float64)
                A[k] = ((2 * u - 1) * bound).to(A.dtype)
                self.B[name][k].zero_()

    def expected_num_trainable(self) -> int:
        cfg, r = self.model.cfg, self.config.rank
        sizes = {
            "q": (cfg.d_model, cfg.n_heads * cfg.head_dim),
            "k": (cfg.d_model, cfg.n_kv_heads * cfg.head_dim),
            "v": (cfg.d_model, cfg.n_kv_heads * cfg.head_dim),
            "o": (cfg.n_heads * cfg.head_dim, cfg.d_model),
            "mlp_in": (cfg.d_model, cfg.mlp_dim),
            "mlp_gate": (cfg.d_model, cfg.mlp_dim),
            "mlp_out": (cfg.mlp_dim, cfg.d_model),
        }
        per_layer = sum(r * sum(sizes[t]) for t in self.config.targets)
        return self.n_adapters * cfg.n_layers * per_layer

    @contextmanager
    def active(self, ids: torch.Tensor | None) -> Any:
        self.current_ids = ids
        try:
            yield
        finally:
            self.current_ids = None

    def detach(self) -> None:
        for parent, attr, base in self._originals:
            setattr(parent, attr, base)
        self._originals.clear()
        super().detach()
