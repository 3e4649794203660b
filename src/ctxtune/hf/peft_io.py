"""Read PEFT adapter folders (prefix tuning, prompt tuning) as ctxtune methods on a Hugging Face model.

Reads `adapter_config.json` and `adapter_model.safetensors` directly (no peft import needed).

Prefix tuning saves "prompt_embeddings" [P, n_layers * 2 * token_dim] with token_dim = n_kv_heads *
d_head (PEFT sizes it to the key/value heads under grouped-query attention). PEFT views it as
[P, n_layers * 2, n_kv_heads, d_head] and permutes to [n_layers * 2, n_kv_heads, P, d_head]: row 2l is
layer l's keys, row 2l + 1 its values. The reparameterisation MLP, if any, is folded away at save.
Prompt tuning saves "prompt_embeddings" [P, d_model]: a soft prompt.

PEFT numbers content after the virtual tokens (positions P..P+T-1): `peft_method` gives ctxtune's
prefix_kv or soft_prompt with position_policy "shift", which reproduces PEFT's logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import CtxtuneError

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
    if config["peft_type"] == "PROMPT_TUNING":
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


def peft_method(model: Any, adapter: PeftAdapter | str | Path) -> Any:
    """The adapter as ctxtune's prefix_kv or soft_prompt (position policy "shift") on `model` (an HFBackbone)."""
    from ctxtune.methods import make_method

    if not isinstance(adapter, PeftAdapter):
        adapter = load_peft_adapter(adapter)
    method = make_method(adapter.method, model, n_virtual=adapter.n_virtual, position_policy="shift")
    dtype = next(model.parameters()).dtype
    if adapter.config["peft_type"] == "PROMPT_TUNING":
        state = {"virtual": adapter.tensors["embeds"][None].to(dtype)}  # [1, P, d_model]
    else:
        key, value = adapter.tensors["key"], adapter.tensors["value"]  # [n_layers, kvh, P, d_head] each
        table = torch.stack([key, value], dim=1).permute(3, 0, 1, 2, 4)  # [L, 2, kvh, P, d] -> [P, L, 2, kvh, d]
        state = {"kv": table.reshape(1, table.shape[0], -1).to(dtype)}  # [1, P, 2 * n_layers * kvh * d_head]
    try:
        method.load_adapter_state(state)
    except CtxtuneError as exc:
        raise CtxtuneError(f"the PEFT adapter does not fit this model: {exc}") from None
    return method
