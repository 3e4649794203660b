"""Prefix-tuning with free keys and values per layer (Li and Liang's result, Hugging Face PEFT's form).

Per layer and head, n_virtual keys and values that bypass the layer's norm and projections. Optional
reparameterisation (Li and Liang): an embedding [P, d_model] -> Linear(d_model, h) -> tanh ->
Linear(h, n_layers * 2 * n_heads * d_head), a training aid that still yields free keys and values.

Trainable, without reparameterisation: K * 2 * n_layers * n_virtual * n_kv_heads * d_head (keys and values
are sized to the key/value heads, as PEFT does under grouped-query attention; n_kv_heads = n_heads on our GPT).
With reparameterisation width h: K * (P*d_model + d_model*h + h + h*w + w), w = 2*L*n_kv_heads*d_head.
Prefix keys carry no position; position policy as for `prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctxtune.errors import ConfigError
from ctxtune.limits import check_int64
from ctxtune.methods.prefix import PrefixBase, PrefixConfig, check_virtual_options
from ctxtune.methods.registry import register_method
from ctxtune.model.gpt import GPT, LayerPrefix


@dataclass(frozen=True)
class PrefixKVConfig(PrefixConfig):
    reparam_dim: int = 0  # 0: no MLP reparameterisation

    def __post_init__(self) -> None:
        check_virtual_options(self)
        dim = self.reparam_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ConfigError(f"reparam_dim must be an integer >= 0, got {dim!r}")
        check_int64(dim, "reparam_dim")


@register_method
class PrefixKV(PrefixBase):
    key = "prefix_kv"
    config_cls = PrefixKVConfig
    peft_type = "PREFIX_TUNING"
    config: PrefixKVConfig

    def __init__(self, model: GPT, config: PrefixKVConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        cfg, K, P, h = model.cfg, n_adapters, config.n_virtual, config.reparam_dim
        self.kv_width = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
        if h == 0:
            self.kv = nn.Parameter(torch.zeros(K, P, self.kv_width, **self.factory))
        else:
            self.embedding = nn.Parameter(torch.zeros(K, P, cfg.d_model, **self.factory))
            self.w1 = nn.Parameter(torch.zeros(K, cfg.d_model, h, **self.factory))
            self.b1 = nn.Parameter(torch.zeros(K, h, **self.factory))
            self.w2 = nn.Parameter(torch.zeros(K, h, self.kv_width, **self.factory))
            self.b2 = nn.Parameter(torch.zeros(K, self.kv_width, **self.factory))
        gen = torch.Generator().manual_seed(0)
        for k in range(K):
            self.init_adapter(k, gen)

    def init_adapter(self, k: int, generator: torch.Generator) -> None:
        def randn(t: torch.Tensor, std: float) -> torch.Tensor:
            return (torch.randn(t.shape[1:], generator=generator, dtype=torch.float64) * std).to(t.dtype)

        with torch.no_grad():
            if self.config.reparam_dim == 0:
                self.kv[k] = randn(self.kv, self.config.init_std)
            else:
                self.embedding[k] = randn(self.embedding, self.config.init_std)
                self.w1[k] = randn(self.w1, self.w1.shape[1] ** -0.5)
                self.w2[k] = randn(self.w2, self.w2.shape[1] ** -0.5)
                self.b1[k].zero_()
                self.b2[k].zero_()

    def expected_num_trainable(self) -> int:
        cfg, P, h = self.model.cfg, self.config.n_virtual, self.config.reparam_dim
        w = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
        per = P * w if h == 0 else P * cfg.d_model + cfg.d_model * h + h + h * w + w
        return self.n_adapters * per

    def kv_table(self, adapter_ids: torch.Tensor | None) -> torch.Tensor:
        """[batch or 1, P, 2 * n_layers * n_heads * d_head]."""
        if self.config.reparam_dim == 0:
            return self.select(self.kv, adapter_ids)
        emb, w1, b1 = (self.select(t, adapter_ids) for t in (self.embedding, self.w1, self.b1))
        w2, b2 = self.select(self.w2, adapter_ids), self.select(self.b2, adapter_ids)
        hidden = torch.tanh(emb @ w1 + b1[:, None])  # [b, P, h]
        return hidden @ w2 + b2[:, None]  # [b, P, kv_width]

    def layer_prefixes(self, adapter_ids: torch.Tensor | None) -> list[LayerPrefix | None]:
        cfg = self.model.cfg
        table = self.kv_table(adapter_ids)
        b, P, _ = table.shape
        kv = table.view(b, P, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim)  # [b, P, L, 2, n_kv_heads, d_head]
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [L, 2, b, n_kv_heads, P, d_head]
        return [LayerPrefix(key=kv[layer, 0], value=kv[layer, 1]) for layer in range(cfg.n_layers)]
