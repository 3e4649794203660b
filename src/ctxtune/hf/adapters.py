"""PEFT adapter folders as ctxtune methods on a Hugging Face model: prefix tuning, prompt tuning and LoRA.

`peft_adapter_method(model, folder)` reads `adapter_config.json` and `adapter_model.safetensors` (never a
pickle; no peft import) and returns the ctxtune method that computes the same logits: prefix tuning and
prompt tuning through `ctxtune.hf.peft_io` (prefix_kv / soft_prompt, positions shifted as PEFT does), LoRA
as ctxtune's `lora` method.

LoRA. PEFT saves, per adapted module, `base_model.model.<module path>.lora_A.weight` [r, d_in] and
`lora_B.weight` [d_out, r], and adds scaling * B A x to the module's output with scaling = lora_alpha / r
(lora_alpha / sqrt(r) with `use_rslora`). ctxtune's LoRA adds (alpha / rank) B A x on the same linear maps,
named by role: q_proj, k_proj, v_proj, o_proj, up_proj, gate_proj, down_proj of a Llama-family block are
q, k, v, o, mlp_in, mlp_gate, mlp_out; GPT-2's attn.c_proj, mlp.c_fc, mlp.c_proj are o, mlp_in, mlp_out
(its fused c_attn has no role). The modules are found from the tensor names, so a `target_modules` list or
regular expression both work. What maps: one rank, one scaling, and the same roles in every layer (ctxtune's
LoRA adapts the same maps in every block); rank-stabilised scaling maps exactly (alpha = scaling * r).
Dropout does not matter at evaluation. Refused, with the reason: another target (embeddings, lm_head,
GPT-2's c_attn), some layers only, per-module ranks or alphas that differ, DoRA, trained biases, extra
trained modules (modules_to_save, trainable tokens), activated LoRA, layer replication, and initialisations
that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ), since the base they were saved against is not
the one loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import CtxtuneError

PREFIX = "base_model.model."
LORA_REFUSED = {  # adapter_config.json key: why a truthy value does not map onto ctxtune's LoRA
    "use_dora": "DoRA (a learned magnitude per output) is not ctxtune's LoRA",
    "lora_bias": "trained LoRA biases are not part of ctxtune's LoRA",
    "modules_to_save": "modules_to_save trains whole extra modules, which ctxtune's LoRA does not hold",
    "trainable_token_indices": "trainable token embeddings are not part of ctxtune's LoRA",
    "alora_invocation_tokens": "activated LoRA (on only after invocation tokens) is not ctxtune's LoRA",
    "layer_replication": "layer replication changes the model's layers",
    "target_parameters": "LoRA on parameters (not modules) is not ctxtune's LoRA",
    "use_qalora": "QA-LoRA (grouped input pooling) is not ctxtune's LoRA",
    "use_bdlora": "block-diagonal LoRA is not ctxtune's LoRA",
}
REWRITES_BASE = ("pissa", "olora", "corda", "loftq")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder (with adapter_model.safetensors beside it)."""
    folder = Path(folder).expanduser()
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise CtxtuneError(f"{folder} is not a PEFT adapter folder: no adapter_config.json")
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.bin")]
        why = " (only adapter_model.bin, a pickle, which ctxtune never loads)" if pickled else ""
        raise CtxtuneError(f"{folder} has no adapter_model.safetensors{why}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CtxtuneError(f"cannot read {cfg_path}: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(config, dict):
        raise CtxtuneError(f"{cfg_path} must hold a JSON object")
    return config


def is_peft_folder(path: str | Path) -> bool:
    """Whether `path` is a folder with an adapter_config.json (a PEFT adapter)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def peft_adapter_method(model: Any, folder: str | Path) -> Any:
    """The PEFT adapter in `folder` as a ctxtune method attached to `model` (an HFBackbone)."""
    config = read_adapter_config(folder)
    kind = config.get("peft_type")
    if kind == "LORA":
        return peft_lora_method(model, folder, config)
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        from ctxtune.hf.peft_io import peft_method

        return peft_method(model, folder)
    raise CtxtuneError(f"PEFT type {kind!r} in {folder} is not supported: PREFIX_TUNING, PROMPT_TUNING or LORA")


# ----- LoRA ---------------------------------------------------------------------------------------------------
def _module_roles(model: Any) -> dict[str, tuple[int, str]]:
    """{module path in the Hugging Face model: (layer, ctxtune LoRA role)} for every linear site of every layer."""
    names = {id(m): name for name, m in model.hf.named_modules()}
    roles = {}
    for layer in range(model.cfg.n_layers):
        for role, (parent, attr) in model.linear_sites(layer).items():
            module = getattr(parent, attr)
            module = getattr(module, "base", module)  # a LoRA already attached wraps the original map
            roles[names[id(module)]] = (layer, role)
    return roles


def _check_lora_config(config: dict[str, Any], folder: Path) -> None:
    for key, why in LORA_REFUSED.items():
        if config.get(key):
            raise CtxtuneError(f"PEFT LoRA in {folder} has {key} = {config[key]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise CtxtuneError(f"PEFT LoRA in {folder} has bias = {config['bias']!r}: trained biases are not part of "
                           "ctxtune's LoRA")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(REWRITES_BASE):
        raise CtxtuneError(f"PEFT LoRA in {folder} was initialised with {init!r}, which rewrites the base weights: "
                           "convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: lora_alpha (or its alpha_pattern entry) over r, or over sqrt(r) (rsLoRA)."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _lora_tensors(state: dict[str, torch.Tensor], roles: dict[str, tuple[int, str]],
                  folder: Path) -> dict[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]]:
    """{(layer, role): (module path, A [r, d_in], B [d_out, r])}; a module without a role is refused."""
    found: dict[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]] = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")].removeprefix(PREFIX)
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in state:
            raise CtxtuneError(f"PEFT LoRA in {folder} has {key!r} without its {b_key!r}")
        if module not in roles:
            raise CtxtuneError(
                f"PEFT LoRA in {folder} adapts {module}, which is none of the maps ctxtune's LoRA has (q, k, v, o, "
                "mlp_in, mlp_gate, mlp_out of each block)")
        found[roles[module]] = (module, state[key], state[b_key])
    other = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if other:
        raise CtxtuneError(f"PEFT LoRA in {folder} also holds {other[0]!r} ({len(other)} tensor(s) that are not LoRA "
                           "A or B matrices, e.g. saved embedding layers): not part of ctxtune's LoRA")
    if not found:
        raise CtxtuneError(f"PEFT LoRA in {folder} holds no lora_A/lora_B tensors")
    return found


def peft_lora_method(model: Any, folder: str | Path, config: dict[str, Any] | None = None) -> Any:
    """A PEFT LoRA adapter folder as ctxtune's `lora` method on `model` (module docstring: what maps)."""
    from safetensors.torch import load_file

    from ctxtune.methods import make_method
    from ctxtune.methods.lora import LORA_TARGETS

    folder = Path(folder).expanduser()
    config = read_adapter_config(folder) if config is None else config
    _check_lora_config(config, folder)
    found = _lora_tensors(load_file(str(folder / "adapter_model.safetensors")), _module_roles(model), folder)
    targets = [t for t in LORA_TARGETS if any(role == t for _, role in found)]
    missing = sorted({(layer, t) for layer in range(model.cfg.n_layers) for t in targets} - set(found))
    if missing:
        raise CtxtuneError(f"PEFT LoRA in {folder} does not adapt {missing[0][1]} in layer {missing[0][0]} (and "
                           f"{len(missing) - 1} more): ctxtune's LoRA adapts the same maps in every layer")
    ranks = {a.shape[0] for _, a, _ in found.values()}
    scales = {_scaling(config, m, a.shape[0]) for m, a, _ in found.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise CtxtuneError(f"PEFT LoRA in {folder} has ranks {sorted(ranks)} and scalings {sorted(scales)} across "
                           "modules: ctxtune's LoRA has one rank and one alpha")
    rank, scale = ranks.pop(), scales.pop()
    dtype = next(model.parameters()).dtype
    method = make_method("lora", model, rank=rank, alpha=scale * rank, targets=targets).to(dtype)
    state = {}
    for (layer, role), (_, a, b) in found.items():
        state[f"A.{layer}_{role}"] = a[None].to(dtype)  # [1, r, d_in]
        state[f"B.{layer}_{role}"] = b[None].to(dtype)  # [1, d_out, r]
    try:
        method.load_adapter_state(state)
    except CtxtuneError as exc:
        method.detach()
        raise CtxtuneError(f"the PEFT LoRA in {folder} does not fit this model: {exc}") from None
    return method


def describe_peft(folder: str | Path) -> str:
    """One line about a PEFT adapter folder, e.g. "PEFT LORA r=4 alpha=8 on q_proj, v_proj"."""
    config = read_adapter_config(folder)
    kind = config.get("peft_type")
    if kind == "LORA":
        targets = config.get("target_modules")
        shown = ", ".join(targets) if isinstance(targets, list) else str(targets)
        return f"PEFT LORA r={config.get('r')} alpha={config.get('lora_alpha')} on {shown}"
    return f"PEFT {kind} with {config.get('num_virtual_tokens')} virtual tokens"
