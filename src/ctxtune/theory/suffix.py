"""Suffix vs prefix: what virtual tokens placed AFTER the input change that a prefix cannot.

Statement tested (paper.md §2 "Suffix variants", §4). At a layer l and a head, write the virtual tokens'
keys/values k^s_j, v^s_j, the attention a_ij of content query i on virtual token j, alpha_i = sum_j a_ij,
and t_i the head output computed WITHOUT the virtual keys on the same layer input and position ids.

* Relative content attention: A_ir = (1 - alpha_i) A^base_ir holds for ANY extra keys, because the
  softmax shares one normaliser. It holds for a suffix too, at every layer (measured: float level).
* Fixed bias: a prefix's (and a leading soft prompt's) k^s, v^s are the same for every input, so the
  bias t^pt_i - (1 - alpha_i) t_i = sum_j a_ij v^s_j is a query-weighted mix of FIXED vectors. A suffix's
  hidden state has attended to the content from layer 2 on, so its keys and values depend on the input:
  the bias is no longer a mix of fixed vectors. Measured as `fixed_bias_unexplained`: the fraction of the
  bias energy that no input-independent values can explain, even given the true weights a_ij
  (least squares over all inputs and queries of B ~ A V with V fixed).
* The suffix position is also a new query over the content: its own output (which predicts the first
  output token) is not the output of any base query (not measured by the identity).

`decomposition(method, tokens, n_prompt)` gives one `LayerDecomposition` per layer; errors are maxima over
heads (attention_err, output_err) or the largest head (the others). The study that trains prefixes, soft
prompts and suffixes at matched budgets and applies this to them is `studies/suffix_vs_prefix.toml`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ctxtune.methods import Method
from ctxtune.model import GPT
from ctxtune.theory.attention import check_attention, check_output, prefix_mass
from ctxtune.theory.capture import LayerAttention, _gpt_attention, capture_method

_HOOKS = (
    "ln1.hook_normalized", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z"
)


@dataclass(frozen=True)
class LayerDecomposition:
    """How well one layer of a context method fits the prefix decomposition (worst head).

    Attributes:
        method: method key.
        layer: 0-based layer index.
        attention_err: max |renormalised content attention - no-virtual attention| on the same layer input.
        output_err: max |z - ((1 - alpha) t + sum_j a_ij v^s_j)| with this run's own virtual values.
        fixed_bias_unexplained: fraction of the bias energy that fixed (input-independent) virtual values
            cannot explain given the true weights a_ij; 0 means "a prefix could produce this bias".
        key_dependence: rms over inputs of |k^s(x) - mean_x k^s| / rms |k^s| (0: keys do not depend on input).
        value_dependence: the same for the values.
        mean_alpha: mean virtual-token attention mass over the queries that can see the virtual tokens.
    """

    method: str
    layer: int
    attention_err: float
    output_err: float
    fixed_bias_unexplained: float
    key_dependence: float
    value_dependence: float
    mean_alpha: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def capture_suffix(method: Method, tokens: torch.Tensor, n_prompt: int) -> list[LayerAttention]:
    """Capture every layer of a suffix run as prefix-like `LayerAttention` records.

    Content = every real token (input and output positions); the suffix positions become the "prefix"
    columns, with per-input keys/values. Suffix rows (its own queries) are dropped. `recompute` runs the
    layer's real attention on the content rows of the same layer input at the same position ids.

    Args:
        method: a `suffix` method (adapter 0 is used); its model in eval mode.
        tokens: [batch, seq] full sequences (input and output tokens).
        n_prompt: number of leading prompt tokens (the suffix goes right after them).
    """
    model: GPT = method.model
    if model.training:
        raise ValueError("put the model in eval mode: dropout breaks the identity")
    prep = method.prepare(tokens, None, n_prompt)
    n_virtual = prep.embeds.shape[1] - tokens.shape[1]  # type: ignore[union-attr]
    seq = prep.embeds.shape[1]  # type: ignore[union-attr]
    device = tokens.device
    suffix_idx = torch.arange(n_prompt, n_prompt + n_virtual, device=device)
    content_idx = torch.cat([torch.arange(n_prompt, device=device), torch.arange(n_prompt + n_virtual, seq)])
    names = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in _HOOKS]
    with method.active(None):
        _, cache = model.run_with_cache(None, embeds=prep.embeds, position_ids=prep.position_ids, names_filter=names)
    content_pos = prep.position_ids[:, content_idx]  # [batch, pos]
    out = []
    for layer, block in enumerate(model.blocks):
        c = {h.rsplit(".", 1)[-1]: cache[f"blocks.{layer}.{h}"] for h in _HOOKS}
        k_all = c["hook_rot_k"].transpose(1, 2)  # [batch, n_heads, seq, d_head]
        v_all = c["hook_v"].transpose(1, 2)
        x = c["hook_normalized"][:, content_idx]  # [batch, pos, d_model]
        cols = torch.cat([suffix_idx, content_idx])
        pattern = c["hook_pattern"][:, :, content_idx][..., cols]  # [batch, n_heads, pos, n_virtual + pos]
        attn = block.attn

        def recompute(module: torch.nn.Module | None = None, _x: torch.Tensor = x, _a: Any = attn) -> tuple:
            return _gpt_attention(module if module is not None else _a, _x, content_pos)

        out.append(
            LayerAttention(
                layer=layer,
                x=x,
                q=c["hook_rot_q"][:, content_idx].transpose(1, 2),  # [batch, n_heads, pos, d_head]
                k=k_all[:, :, content_idx],
                v=v_all[:, :, content_idx],
                prefix_k=k_all[:, :, suffix_idx],  # [batch, n_heads, n_virtual, d_head], input-dependent
                prefix_v=v_all[:, :, suffix_idx],
                pattern=pattern,
                z=c["hook_z"][:, content_idx],
                position_ids=content_pos,
                recompute=recompute,
            )
        )
    return out


def capture_virtual(method: Method, tokens: torch.Tensor, n_prompt: int) -> list[LayerAttention]:
    """`capture_suffix` for a suffix, the theory's `capture_method` for prefixes and soft prompts."""
    if method.identity == "partial":
        return capture_suffix(method, tokens, n_prompt)
    return capture_method(method, tokens)


def fixed_bias_unexplained(la: LayerAttention, t: torch.Tensor) -> list[float]:
    """Per head: fraction of the bias energy not expressible with input-independent virtual values.

    Fits B [N, d_head] ~ A [N, n_virtual] V [n_virtual, d_head] by least squares over every input and query
    that sees the virtual tokens (A = the true weights a_ij, B = t^pt - (1 - alpha) t), and returns
    |B - A V|^2 / |B|^2. A prefix gives 0 up to float error.
    """
    alpha = prefix_mass(la)  # [batch, n_heads, pos]
    bias = la.z - (1 - alpha.transpose(1, 2))[..., None] * t  # [batch, pos, n_heads, d_head]
    a = la.pattern[..., : la.n_virtual]  # [batch, n_heads, pos, n_virtual]
    out = []
    for h in range(la.n_heads):
        seen = alpha[:, h] > 1e-9  # [batch, pos]
        if not bool(seen.any()):
            out.append(0.0)
            continue
        b = bias[:, :, h][seen]  # [N, d_head]
        w = a[:, h][seen]  # [N, n_virtual]
        sol = torch.linalg.lstsq(w, b).solution  # [n_virtual, d_head]
        energy = float((b**2).sum())
        out.append(float(((b - w @ sol) ** 2).sum()) / energy if energy > 0 else 0.0)
    return out


def input_dependence(kv: torch.Tensor) -> list[float]:
    """Per head: rms over inputs of |kv(x) - mean_x kv| divided by rms |kv|; kv [batch, n_heads, P, d_head]."""
    dev = kv - kv.mean(0, keepdim=True)
    num = dev.pow(2).sum(dim=(2, 3)).mean(0).sqrt()  # [n_heads]
    den = kv.pow(2).sum(dim=(2, 3)).mean(0).sqrt().clamp_min(1e-30)
    return (num / den).tolist()


@torch.no_grad()
def decomposition(method: Method, tokens: torch.Tensor, n_prompt: int) -> list[LayerDecomposition]:
    """The per-layer decomposition errors of a context method (prefix, prefix_kv, soft_prompt, suffix)."""
    out = []
    for la in capture_virtual(method, tokens, n_prompt):
        if la.n_virtual == 0:
            continue
        base_pattern, t = la.recompute()
        att = max(r.max_abs_err for r in check_attention(la, base_pattern))
        outp = max(r.max_abs_err for r in check_output(la, t))
        alpha = prefix_mass(la)  # [batch, n_heads, pos]
        seen = alpha > 1e-9
        out.append(
            LayerDecomposition(
                method=method.key,
                layer=la.layer,
                attention_err=att,
                output_err=outp,
                fixed_bias_unexplained=max(fixed_bias_unexplained(la, t)),
                key_dependence=max(input_dependence(la.prefix_k)),
                value_dependence=max(input_dependence(la.prefix_v)),
                mean_alpha=float(alpha[seen].mean()) if bool(seen.any()) else 0.0,
            )
        )
    return out
