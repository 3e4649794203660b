"""Read PEFT adapter folders (prefix tuning, prompt tuning) into ctxtune's attach format.

Reads `adapter_config.json` and `adapter_model.safetensors` directly (no peft import needed).

Prefix tuning saves "prompt_embeddings" [P, n_layers * 2 * token_dim] with token_dim = n_kv_heads *
d_head (PEFT sizes it to the key/value heads under grouped-query attention). PEFT views it as
[P, n_layers * 2, n_kv_heads, d_head] and permutes to [n_layers * 2, n_kv_heads, P, d_head]: row 2l is
layer l's keys, row 2l + 1 its values. The reparameterisation MLP, if any, is folded away at save.
Prompt tuning saves "prompt_embeddings" [P, d_model]: a soft prompt.

PEFT numbers content after the virtual tokens (positions P..P+T-1), so `attach_peft` defaults to
positions="shift" to reproduce PEFT's logits; the identity checks hold under either convention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctxtune.errors import CtxtuneError
from ctxtune.hf.attach import Attachment, attach_prefix_kv, attach_soft_prompt, hf_layout

_KINDS = {"PREFIX_TUNING": "prefix_kv", "PROMPT_TUNING": "soft_prompt"}


@dataclass
class PeftAdapter:
    """A PEFT adapter in ctxtune's form.

    Attributes:
        method: "prefix_kv" or "soft_prompt".
        tensors: {"key", "value"}: [n_layers, n_kv_heads, P, d_head] each; or {"embeds"}: [P, d_model].
        config: the adapter_config.json contents.
    """

    method: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]

    @property
    def n_virtual(self) -> int:
        return int(self.config["num_virtual_tokens"])


def load_peft_adapter(folder: str | Path) -> PeftAdapter:
    """Read a PEFT prefix-tuning or prompt-tuning adapter folder.

    Raises:
        CtxtuneError: missing files, another PEFT type, or inconsistent shapes.
    """
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CtxtuneError(
            f"{folder} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
        )
    config = json.loads(cfg_path.read_text())
    kind = _KINDS.get(str(config.get("peft_type")))
    if kind is None:
        raise CtxtuneError(
            f"PEFT type {config.get('peft_type')!r} is not a context method; expected {sorted(_KINDS)}"
        )
    from safetensors.torch import load_file

    state = load_file(str(weights))
    if "prompt_embeddings" not in state:
        raise CtxtuneError(f"{weights} has no 'prompt_embeddings' tensor (keys: {sorted(state)})")
    emb = state["prompt_embeddings"]
    p = int(config["num_virtual_tokens"]) * int(config.get("num_transformer_submodules") or 1)
    if emb.shape[0] != p:
        raise CtxtuneError(
            f"prompt_embeddings has {emb.shape[0]} rows, adapter_config says {p} virtual tokens"
        )
    if kind == "soft_prompt":
        return PeftAdapter(kind, {"embeds": emb}, config)
    n_layers, kvh, token_dim = (
        int(config["num_layers"]),
        int(config["num_attention_heads"]),
        int(config["token_dim"]),
    )
    width = 2 * n_layers * token_dim
    if emb.shape[1] != width:
        raise CtxtuneError(
            f"prompt_embeddings width {emb.shape[1]} != num_layers * 2 * token_dim = {width}"
        )
    kv = emb.view(p, n_layers * 2, kvh, token_dim // kvh).permute(
        1, 2, 0, 3
    )  # [n_layers * 2, kvh, P, d_head]
    return PeftAdapter(kind, {"key": kv[0::2].contiguous(), "value": kv[1::2].contiguous()}, config)


def attach_peft(model: nn.Module, adapter: PeftAdapter | str | Path, positions: str = "shift") -> Attachment:
    """Attach a PEFT adapter to a HF causal LM through ctxtune's attention hooks (shapes checked)."""
    if not isinstance(adapter, PeftAdapter):
        adapter = load_peft_adapter(adapter)
    lay = hf_layout(model)
    dtype = lay.embed.weight.dtype
    if adapter.method == "soft_prompt":
        return attach_soft_prompt(model, adapter.tensors["embeds"].to(dtype), positions)
    key, value = adapter.tensors["key"].to(dtype), adapter.tensors["value"].to(dtype)
    return attach_prefix_kv(model, key, value, positions)
