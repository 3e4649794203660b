"""Export ctxtune runs for the Hugging Face ecosystem.

Two exports, both exact (same logits up to float rounding) or refused with the reason:

* `export_gpt2`: a ctxtune GPT as a GPT-2 folder (config.json + model.safetensors) that
  `transformers.GPT2LMHeadModel.from_pretrained` loads. GPT-2 is pre-LayerNorm, residual, learned
  absolute positions, d_head = d_model / n_heads, GELU-tanh ("gelu_new") or ReLU. A model without
  biases, without positional embeddings or without an MLP is written with zero biases, zero position
  embeddings or a zero MLP, which GPT-2 computes exactly (its output is exactly 0). Rotary positions,
  RMSNorm, no norms, no pre-attention norm, no residual and d_head != d_model / n_heads are refused.
  Linear weights [out, in] become GPT-2's Conv1D weights [in, out]; q, k, v go into `c_attn` side by side.

* `export_peft`: a prefix_kv, prefix or soft_prompt adapter as a PEFT folder (adapter_config.json +
  adapter_model.safetensors) that `peft.PeftModel.from_pretrained(hf_model, folder)` loads.
  PEFT's layout, read from peft's source (PeftModel.get_prompt): prefix tuning stores
  "prompt_embeddings" [P, num_layers * 2 * token_dim], token_dim = n_heads * d_head, viewed as
  [P, num_layers * 2, n_heads, d_head] and permuted so that row 2l is layer l's keys and row 2l + 1
  its values; the keys enter the cache as they are (no position, like ctxtune's prefix keys). Prompt
  tuning stores "prompt_embeddings" [P, d_model], prepended to the input embeddings. The paper's
  `prefix` (hidden states) is exported as the keys and values the frozen model makes of it; a
  reparameterised prefix_kv as the keys and values its MLP produces (as PEFT itself saves it).

Positions. PEFT numbers the content after the virtual tokens: P..P+T-1 (prefix: the cache holds P
entries; prompt: the virtual tokens sit at 0..P-1). That is ctxtune's "shift" policy, exported as is.
Under "keep" (content at 0..T-1, virtual tokens without position):
  - no positional scheme ("none"): positions change nothing, exported as is;
  - rotary, prefix: a content query at position i scores R(i)q . k; in PEFT it sits at P + i and
    R(P + i)q . R(P)k = R(i)q . k, so the prefix keys are exported rotated by position P (exact);
  - learned absolute positions: the content would get embeddings P..P+T-1 instead of 0..T-1: refused;
  - rotary soft prompt: the virtual tokens' own keys are computed by the model at every layer and
    would be rotated to 0..P-1: refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ctxtune.errors import CtxtuneError
from ctxtune.io import atomic_write_bytes
from ctxtune.methods import Method
from ctxtune.model import GPT, ModelConfig
from ctxtune.model.gpt import apply_rotary, rotary_tables

GPT2_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu"}
TOL_COPIED = 1e-9  # float64 check, tensors copied: only float64 arithmetic differs (seen: ~1e-16)
TOL_ROUNDED = 1e-6  # float64 check, keys/values computed then rounded to float32 once


class ExportRefused(CtxtuneError):
    """The run cannot be expressed exactly in the target format; the message says why."""


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        kind: "gpt2" or "peft".
        folder: the folder written.
        files: file names in it.
        notes: how ctxtune features were expressed (zero biases, positions converted, ...).
        check: the logit comparison, if one was run: {"dtype", "max_abs_diff", "tol", "passed", ...}.
    """

    kind: str
    folder: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "files": self.files, "notes": self.notes,
                "check": self.check}


# ----- writing a folder atomically ------------------------------------------------------------------
def write_folder(out: Path, files: dict[str, bytes], overwrite: bool = False) -> None:
    """Write `files` {name: bytes} as the folder `out`, all or nothing.

    The files go into a hidden temporary folder beside `out`, which is then renamed to `out`; a
    reader never sees a half-written folder. An existing non-empty `out` is replaced only with
    `overwrite` (moved aside first, removed after the rename).

    Raises:
        CtxtuneError: `out` exists (not empty, no overwrite), is a file, or cannot be written.
    """
    out = Path(out)
    if out.is_file():
        raise CtxtuneError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CtxtuneError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, moving an existing `out` aside first."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise CtxtuneError(f"cannot write {out}: {exc.strerror or exc}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(clean, metadata={"format": "pt"})


# ----- GPT-2 -----------------------------------------------------------------------------------------
def gpt2_refusals(cfg: ModelConfig) -> list[str]:
    """Why GPT-2 cannot express `cfg` exactly (empty: it can)."""
    reasons = []
    if cfg.pos == "rotary":
        reasons.append("the model uses rotary positions; GPT-2 has learned absolute position embeddings only")
    if cfg.norm == "rmsnorm":
        reasons.append("the model uses RMSNorm; GPT-2 uses LayerNorm")
    if cfg.norm == "none":
        reasons.append("the model has no norms; GPT-2 applies LayerNorm before each sublayer and at the end")
    elif not cfg.attn_norm:
        reasons.append("the model has no pre-attention norm; GPT-2 normalises every attention input")
    if not cfg.residual:
        reasons.append("the model has no residual connections; GPT-2 always adds each sublayer to the stream")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        reasons.append(
            f"d_head={cfg.head_dim} with n_heads={cfg.n_heads} is not d_model={cfg.d_model}; "
            "GPT-2 needs d_head = d_model / n_heads"
        )
    return reasons


def gpt2_config(model: GPT) -> dict[str, Any]:
    """The config.json of the GPT-2 equivalent of `model`."""
    cfg = model.cfg
    eps = model.ln_final.norm.eps
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.d_vocab,
        "n_positions": cfg.n_ctx,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.mlp_dim,
        "activation_function": GPT2_ACTIVATIONS[cfg.act],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_cache": True,
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
    }


def _linear_as_conv1d(linear: torch.nn.Linear | None, d_in: int, d_out: int, like: torch.Tensor) -> tuple:
    """(weight [d_in, d_out], bias [d_out]) of GPT-2's Conv1D; zeros where ctxtune has no layer or bias."""
    if linear is None:
        return torch.zeros(d_in, d_out, dtype=like.dtype), torch.zeros(d_out, dtype=like.dtype)
    bias = linear.bias if linear.bias is not None else torch.zeros(d_out, dtype=like.dtype)
    return linear.weight.detach().T, bias.detach()


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (GPT2LMHeadModel names) holding `model`'s weights."""
    cfg, like = model.cfg, model.embed.weight
    state = {"transformer.wte.weight": model.embed.weight.detach()}
    wpe = model.pos_embed.weight.detach() if model.pos_embed is not None else torch.zeros(cfg.n_ctx, cfg.d_model)
    state["transformer.wpe.weight"] = wpe.to(like.dtype)
    for i, block in enumerate(model.blocks):
        pre = f"transformer.h.{i}"
        attn = block.attn
        qkv = [_linear_as_conv1d(p, cfg.d_model, cfg.d_model, like) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        state[f"{pre}.attn.c_attn.weight"] = torch.cat([w for w, _ in qkv], dim=1)  # [d_model, 3 * d_model]
        state[f"{pre}.attn.c_attn.bias"] = torch.cat([b for _, b in qkv])
        state[f"{pre}.attn.c_proj.weight"], state[f"{pre}.attn.c_proj.bias"] = _linear_as_conv1d(
            attn.o_proj, cfg.d_model, cfg.d_model, like
        )
        state.update(_gpt2_norm(f"{pre}.ln_1", block.ln1.norm, like))
        state.update(_gpt2_norm(f"{pre}.ln_2", block.ln2.norm if block.ln2 is not None else None, like))
        mlp = block.mlp
        state[f"{pre}.mlp.c_fc.weight"], state[f"{pre}.mlp.c_fc.bias"] = _linear_as_conv1d(
            mlp.fc_in if mlp is not None else None, cfg.d_model, cfg.mlp_dim, like
        )
        state[f"{pre}.mlp.c_proj.weight"], state[f"{pre}.mlp.c_proj.bias"] = _linear_as_conv1d(
            mlp.fc_out if mlp is not None else None, cfg.mlp_dim, cfg.d_model, like
        )
    state.update(_gpt2_norm("transformer.ln_f", model.ln_final.norm, like))
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = model.unembed.weight.detach()
    return state


def _gpt2_norm(name: str, norm: torch.nn.Module | None, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """LayerNorm weight and bias under GPT-2's name; a unit LayerNorm where the model has none (no MLP)."""
    if norm is None:
        d_model = like.shape[-1]
        return {f"{name}.weight": torch.ones(d_model, dtype=like.dtype), f"{name}.bias": torch.zeros_like(like[0])}
    return {f"{name}.weight": norm.weight.detach(), f"{name}.bias": norm.bias.detach()}


def gpt2_notes(cfg: ModelConfig) -> list[str]:
    """How ctxtune features without a GPT-2 counterpart were written (each one exact)."""
    notes = []
    if not cfg.bias:
        notes.append("no biases: written as zero biases")
    if cfg.pos == "none":
        notes.append("no positional embeddings: written as zero position embeddings")
    if not cfg.mlp:
        notes.append("no MLP: written as a zero MLP (its output is exactly 0)")
    return notes


def gpt2_files(model: GPT) -> dict[str, bytes]:
    """The files of the GPT-2 folder.

    Raises:
        ExportRefused: GPT-2 cannot express the model (every reason, in one line).
    """
    reasons = gpt2_refusals(model.cfg)
    if reasons:
        raise ExportRefused(f"cannot export this model as GPT-2: {'; '.join(reasons)}")
    return {
        "config.json": _json_bytes(gpt2_config(model)),
        "model.safetensors": _safetensors_bytes(gpt2_state_dict(model)),
    }


# ----- PEFT -----------------------------------------------------------------------------------------
def peft_refusal(method: Method) -> str | None:
    """Why `method` cannot be a PEFT adapter with the same logits (None: it can)."""
    from ctxtune.methods import get_method_class, list_methods
    from ctxtune.model import GPT

    if not isinstance(method.model, GPT):
        return ("the run's base is a Hugging Face model: PEFT export is written for ctxtune's GPT "
                "(export the GPT base with `ctxtune export gpt2`); a Hugging Face base is not supported yet")
    if method.peft_type is None:
        exportable = [k for k in list_methods() if get_method_class(k).peft_type is not None]
        return (
            f"method {method.key!r} has no PEFT prompt-learning counterpart; exportable methods: "
            f"{', '.join(exportable)} (a full fine-tune exports as a model)"
        )
    policy, pos = method.config.position_policy, method.model.cfg.pos  # type: ignore[attr-defined]
    if policy == "shift" or pos == "none":
        return None
    if pos == "learned":
        return (
            f"the run used position_policy 'keep' on learned absolute positions: ctxtune put the content at "
            f"positions 0..T-1, PEFT puts it at {method.config.n_virtual}..: no adapter reproduces that; "  # type: ignore[attr-defined]
            "train with position_policy 'shift' to export"
        )
    if method.peft_type == "PROMPT_TUNING":
        return (
            "the run is a soft prompt under position_policy 'keep' on rotary positions: PEFT rotates the virtual "
            "tokens' own keys to positions 0..P-1 at every layer, which the adapter cannot undo; "
            "train with position_policy 'shift' to export"
        )
    return None


def _prefix_keys_values(method: Method, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer prefix keys and values, [n_layers, n_heads, P, d_head] each, as the model attends to them."""
    keys, values = [], []
    for block, lp in zip(method.model.blocks, method.layer_prefixes(ids), strict=True):  # type: ignore[attr-defined]
        normed = block.ln1.norm(lp.hidden) if lp.hidden is not None else None
        k, v = block.attn.prefix_kv(lp, normed)  # [1, n_heads, P, d_head]
        keys.append(k[0])
        values.append(v[0])
    return torch.stack(keys), torch.stack(values)


def _rotate_keys_to(keys: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """Rotate keys [n_layers, n_heads, P, d_head] by rotary position `position` (float64 inside)."""
    n_layers, n_heads, p, d_head = keys.shape
    flat = keys.to(torch.float64).permute(0, 2, 1, 3).reshape(1, n_layers * p, n_heads, d_head)  # [1, L*P, H, d]
    cos, sin = rotary_tables(torch.full((1, n_layers * p), position), d_head, base)
    rotated = apply_rotary(flat, cos, sin).reshape(n_layers, p, n_heads, d_head)  # [L, P, H, d]
    return rotated.permute(0, 2, 1, 3).to(keys.dtype)  # [L, H, P, d]


def peft_prompt_embeddings(method: Method, index: int = 0) -> tuple[torch.Tensor, list[str], bool]:
    """PEFT's "prompt_embeddings" for adapter `index` of `method`, notes on the conversion, and whether
    the tensor was computed (True) rather than copied from the adapter (False).

    Returns [P, n_layers * 2 * n_heads * d_head] for a prefix, [P, d_model] for a soft prompt, in the
    adapter's dtype. Computed tensors (a paper-form prefix's keys and values, a reparameterised
    prefix, rotated keys) are computed in float64 and rounded once to that dtype.

    Raises:
        ExportRefused: the method or its positions cannot be expressed (see `peft_refusal`).
        CtxtuneError: `index` is not an adapter of the bank.
    """
    reason = peft_refusal(method)
    if reason:
        raise ExportRefused(f"cannot export as a PEFT adapter: {reason}")
    if not 0 <= index < method.n_adapters:
        raise CtxtuneError(f"--index {index} is out of range: the run holds {method.n_adapters} adapter(s)")
    ids = torch.tensor([index])
    stored = next(method.parameters()).dtype
    cfg, policy = method.model.cfg, method.config.position_policy  # type: ignore[attr-defined]
    notes = [f"position_policy {policy!r} on {cfg.pos!r} positions"]
    if method.peft_type == "PROMPT_TUNING":
        return method.select(method.virtual, ids)[0].detach().clone(), notes, False  # type: ignore[attr-defined]
    rotate = policy == "keep" and cfg.pos == "rotary"
    tied = any(lp.hidden is not None for lp in method.layer_prefixes(ids))  # type: ignore[attr-defined]
    computed = rotate or tied or getattr(method.config, "reparam_dim", 0) > 0
    with torch.no_grad():
        keys, values = _prefix_keys_values(_method_copy(method, torch.float64) if computed else method, ids)
        if rotate:
            p = method.config.n_virtual  # type: ignore[attr-defined]
            keys = _rotate_keys_to(keys, p, cfg.rotary_base)
            notes.append(f"keep -> PEFT's shifted content: prefix keys rotated by position {p}")
        if tied:
            notes.append("paper-form prefix: exported as the keys and values the frozen model makes of it")
        kv = torch.stack([keys, values], dim=1)  # [n_layers, 2, n_heads, P, d_head]
        n_layers, _, n_heads, p, d_head = kv.shape
        flat = kv.permute(3, 0, 1, 2, 4).reshape(p, n_layers * 2 * n_heads * d_head)  # [P, L * 2 * H * d_head]
    if computed and stored != torch.float64:
        notes.append(f"computed in float64, stored as {str(stored).removeprefix('torch.')}")
    return flat.to(stored).contiguous(), notes, computed


def _method_copy(method: Method, dtype: torch.dtype) -> Method:
    """A copy of `method` and of its model in `dtype`, eval mode (the original is untouched)."""
    import copy

    twin = copy.deepcopy(method)  # copies the model it refers to as well
    twin.model.to(dtype).eval()  # type: ignore[attr-defined]
    return twin.to(dtype).eval()


def peft_config(method: Method, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json of the PEFT export (the fields PEFT's PromptLearningConfig reads)."""
    cfg = method.model.cfg
    kind = method.peft_type
    token_dim = cfg.n_heads * cfg.head_dim if kind == "PREFIX_TUNING" else cfg.d_model
    out: dict[str, Any] = {
        "peft_type": kind,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "num_virtual_tokens": method.config.n_virtual,  # type: ignore[attr-defined]
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers,
    }
    if kind == "PREFIX_TUNING":
        out.update({"prefix_projection": False, "encoder_hidden_size": token_dim})
    else:
        out.update({"prompt_tuning_init": "RANDOM"})
    return out


def peft_files(
    method: Method, index: int = 0, base_model: str | None = None
) -> tuple[dict[str, bytes], list[str], float]:
    """The files of the PEFT adapter folder, the conversion notes, and the tolerance of its float64 check.

    The tolerance is TOL_COPIED when the stored tensor is the adapter's own (or computed and stored in
    float64), TOL_ROUNDED when it was computed and rounded once to float32 (relative error ~6e-8 on
    every key and value).
    """
    emb, notes, computed = peft_prompt_embeddings(method, index)
    files = {
        "adapter_config.json": _json_bytes(peft_config(method, base_model)),
        "adapter_model.safetensors": _safetensors_bytes({"prompt_embeddings": emb}),
    }
    return files, notes, TOL_ROUNDED if computed and emb.dtype != torch.float64 else TOL_COPIED


# ----- checks: load what was written and compare logits ------------------------------------------------
def check_tokens(cfg: ModelConfig, n_virtual: int, seed: int = 0) -> torch.Tensor:
    """[2, T] random token ids that fit n_ctx after n_virtual shifted positions."""
    length = max(1, min(8, cfg.n_ctx - n_virtual))
    return torch.randint(0, cfg.d_vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def load_gpt2(folder: Path, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """GPT2LMHeadModel.from_pretrained(folder) offline, eager attention, eval mode."""
    from ctxtune.hf.loading import _transformers

    transformers = _transformers()
    model = transformers.GPT2LMHeadModel.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True, attn_implementation="eager"
    )
    return model.eval()


@torch.no_grad()
def compare_gpt2(
    model: GPT, folder: Path, dtype: torch.dtype = torch.float64, tol: float = TOL_COPIED
) -> dict[str, Any]:
    """Max |ctxtune logits - transformers logits| on random tokens, both in `dtype`."""
    ours = _copy_as(model, dtype)
    hf = load_gpt2(folder, dtype)
    tokens = check_tokens(model.cfg, 0)
    diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    return {"against": "transformers GPT2LMHeadModel", "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": diff, "tol": tol, "passed": diff <= tol}


@torch.no_grad()
def compare_peft(
    method: Method, gpt2_folder: Path, adapter_folder: Path, index: int = 0,
    dtype: torch.dtype = torch.float64, tol: float = TOL_COPIED,
) -> dict[str, Any]:
    """Max |ctxtune method logits - PEFT logits| on random tokens: PeftModel.from_pretrained on the GPT-2 folder."""
    import warnings

    from ctxtune.hf.loading import _transformers

    _transformers()
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CtxtuneError("checking a PEFT export needs the [hf] extra: pip install 'ctxtune[hf]'") from e
    p = method.config.n_virtual  # type: ignore[attr-defined]
    tokens = check_tokens(method.model.cfg, p)
    ids = torch.full((tokens.shape[0],), index) if method.n_adapters > 1 else None
    ours = _method_copy(method, dtype)(tokens, ids)  # [batch, T, d_vocab]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(load_gpt2(gpt2_folder, dtype), str(adapter_folder)).eval()
        logits = wrapped(input_ids=tokens).logits
    theirs = logits[:, -tokens.shape[1]:]  # prompt tuning returns P extra rows first
    diff = (ours - theirs).abs().max().item()
    return {"against": "peft PeftModel on the exported GPT-2", "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": diff, "tol": tol, "passed": diff <= tol}


def _copy_as(model: GPT, dtype: torch.dtype) -> GPT:
    import copy

    return copy.deepcopy(model).to(dtype).eval()


# ----- the two exports ------------------------------------------------------------------------------
def export_gpt2(model: GPT, out: str | Path, overwrite: bool = False, check: bool = True) -> ExportResult:
    """Write `model` as a GPT-2 folder at `out`; with `check`, load it with transformers first and compare.

    Raises:
        ExportRefused: GPT-2 cannot express the model.
        CtxtuneError: `out` exists, or the check found different logits (nothing is written then).
    """
    out = Path(out)
    files = gpt2_files(model)
    result = ExportResult("gpt2", out, sorted(files), gpt2_notes(model.cfg))
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            write_folder(Path(tmp) / "gpt2", files)
            result.check = compare_gpt2(model, Path(tmp) / "gpt2")
        _raise_if_failed(result)
    write_folder(out, files, overwrite)
    return result


def export_peft(
    method: Method, out: str | Path, index: int = 0, base_model: str | None = None,
    overwrite: bool = False, check: bool = True,
) -> ExportResult:
    """Write adapter `index` of `method` as a PEFT folder at `out`.

    With `check` and a model GPT-2 can express, the base is exported to a temporary GPT-2 folder, PEFT
    loads the adapter onto it, and its logits are compared with ctxtune's; otherwise the result's
    notes say why no check ran.

    Raises:
        ExportRefused: the method or its position policy cannot be expressed in PEFT.
        CtxtuneError: `out` exists, a bad index, or the check found different logits (nothing written).
    """
    out = Path(out)
    files, notes, tol = peft_files(method, index, base_model)
    result = ExportResult("peft", out, sorted(files), notes)
    if check:
        reasons = gpt2_refusals(method.model.cfg)
        if reasons:
            result.notes.append(f"not checked against PEFT: the base model is not GPT-2-shaped ({reasons[0]})")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_folder(Path(tmp) / "gpt2", gpt2_files(method.model))
                write_folder(Path(tmp) / "adapter", files)
                result.check = compare_peft(method, Path(tmp) / "gpt2", Path(tmp) / "adapter", index, tol=tol)
            _raise_if_failed(result)
    write_folder(out, files, overwrite)
    return result


def _raise_if_failed(result: ExportResult) -> None:
    if result.check is not None and not result.check["passed"]:
        raise CtxtuneError(
            f"export check failed: max |logit difference| {result.check['max_abs_diff']:.3g} > "
            f"{result.check['tol']:.0e} against {result.check['against']}; nothing written (please report this)"
        )
