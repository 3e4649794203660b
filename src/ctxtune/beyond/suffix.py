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

Results JSON (`results/beyond/suffix_vs_prefix.json`, written by `run_study`)::

    {
      "kind": "suffix_vs_prefix",
      "scale": "quick",
      "seconds": float,
      "bases": {name: {"task": str, "model": ModelConfig dict, "accuracy": float, "seconds": float}},
      "decomposition": [ {"case": str, "method": str, "layer": int, "attention_err": float,
                          "output_err": float, "fixed_bias_unexplained": float,
                          "key_dependence": float, "value_dependence": float, "mean_alpha": float} ],
      "learning": [ {"case": str, "base": str, "task": str, "method": str, "options": dict,
                     "trainable": int, "steps": int, "seeds": int, "accuracy": [float per seed],
                     "final_loss": [float per seed], "seconds": float} ]
    }

Errors are maxima over heads (attention_err, output_err) or the largest head (the others).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ctxtune.io import atomic_write_json
from ctxtune.methods import Method
from ctxtune.model import GPT, ModelConfig
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
    if method.key == "suffix":
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


# ---------------------------------------------------------------------------------------- the study
QUICK_BASES: dict[str, dict[str, Any]] = {
    "ascending_1l": {
        "task": "ascending",
        "model": {"n_layers": 1, "n_heads": 1, "d_model": 64, "n_ctx": 32, "act": "relu", "dropout": 0.0},
        "steps": 1500,
    },
    "ascending_2l": {
        "task": "ascending",
        "model": {"n_layers": 2, "n_heads": 2, "d_model": 64, "n_ctx": 32, "act": "relu", "dropout": 0.0},
        "steps": 1500,
    },
    "mix_2l": {
        "task": "mix",
        "model": {"n_layers": 2, "n_heads": 2, "d_model": 64, "n_ctx": 32, "act": "relu", "dropout": 0.0},
        "steps": 4000,
    },
}
"""Bases of the quick scale (the reproduce studies' quick models; `ascending_2l` is added so that a
suffix has a second layer in which its keys/values can depend on the input)."""

QUICK_CASES: list[dict[str, Any]] = [
    {"case": "descending_from_ascending_1l", "base": "ascending_1l", "task": "descending", "prefix_len": 1},
    {"case": "descending_from_ascending_2l", "base": "ascending_2l", "task": "descending", "prefix_len": 1},
    {"case": "double_hist_from_mix", "base": "mix_2l", "task": "double_hist", "prefix_len": 1},
]
"""Learning cases. Matched budget: the prefix has n_layers * prefix_len * d_model parameters; the soft
prompt and suffix get n_virtual = n_layers * prefix_len, i.e. the same count."""


def pretrain_config(steps: int, seed: int = 0, eval_examples: int = 500) -> Any:
    """The reproduce studies' quick pretraining schedule (cosine, lr 3e-3, weight decay 0.1 on matrices)."""
    from ctxtune.train.config import TrainConfig

    return TrainConfig(
        steps=steps,
        lr=3e-3,
        warmup=100,
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.1,
        decay_matrices_only=True,
        train_mode=True,
        seed=seed,
        eval_examples=eval_examples,
    )


def adapter_config(steps: int, seed: int = 0, eval_examples: int = 500, lr: float = 2e-2) -> Any:
    """The studies' quick context-method schedule (cosine, lr 2e-2, no weight decay)."""
    from ctxtune.train.config import TrainConfig

    return TrainConfig(
        steps=steps,
        lr=lr,
        warmup=50,
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.0,
        seed=seed,
        eval_examples=eval_examples,
    )


def get_base(name: str, spec: dict[str, Any], bases_dir: Path) -> tuple[GPT, dict[str, Any]]:
    """Load the base run `bases_dir/name`, or pretrain it there first."""
    from ctxtune.train.api import pretrain
    from ctxtune.train.runs import load_base_model

    run = bases_dir / name
    if (run / "model.safetensors").is_file():
        import json

        summary = json.loads((run / "summary.json").read_text())
        return load_base_model(run), {"accuracy": summary["accuracy"][spec["task"]], "seconds": summary["seconds"]}
    model, res = pretrain(ModelConfig(**spec["model"]), spec["task"], pretrain_config(spec["steps"]), out_dir=run)
    return model, {"accuracy": res.accuracy[0], "seconds": res.seconds}


def run_study(
    out_file: Path,
    bases_dir: Path,
    steps: int = 800,
    seeds: int = 2,
    eval_examples: int = 500,
    n_decomp: int = 64,
    cases: list[dict[str, Any]] | None = None,
    bases: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Learning comparison at matched budgets plus the decomposition of the trained adapters.

    Seeds are stacked as an adapter bank (one adapter per seed, same task). The decomposition uses the
    adapter of seed 0 on `n_decomp` test examples, in float64.

    Returns:
        The results object (also written to `out_file`, schema in the module docstring).
    """
    from ctxtune.tasks import get_task
    from ctxtune.train.api import tune

    t0 = time.time()
    cases = QUICK_CASES if cases is None else cases
    bases = QUICK_BASES if bases is None else bases
    result: dict[str, Any] = {
        "kind": "suffix_vs_prefix",
        "scale": "quick",
        "bases": {},
        "decomposition": [],
        "learning": [],
    }
    loaded: dict[str, GPT] = {}
    for case in cases:
        name = case["base"]
        if name not in loaded:
            loaded[name], info = get_base(name, bases[name], bases_dir)
            result["bases"][name] = {"task": bases[name]["task"], "model": bases[name]["model"], **info}
        base = loaded[name]
        n_layers = base.cfg.n_layers
        task = get_task(case["task"])
        batch = task.make_batch(n_decomp, torch.Generator().manual_seed(123), split="test")
        budgets = {
            "prefix": {"n_virtual": case["prefix_len"]},
            "soft_prompt": {"n_virtual": n_layers * case["prefix_len"], "init": "randn"},
            "suffix": {"n_virtual": n_layers * case["prefix_len"], "init": "randn"},
        }
        for key, options in budgets.items():
            model = copy.deepcopy(base)
            start = time.time()
            method, res = tune(model, key, [case["task"]] * seeds, adapter_config(steps, 0, eval_examples), options)
            result["learning"].append(
                {
                    "case": case["case"],
                    "base": name,
                    "task": case["task"],
                    "method": key,
                    "options": options,
                    "trainable": method.num_trainable() // seeds,
                    "steps": steps,
                    "seeds": seeds,
                    "accuracy": res.accuracy,
                    "final_loss": res.final_loss,
                    "seconds": round(time.time() - start, 1),
                }
            )
            method.double()
            model.double().eval()
            tokens = batch.tokens
            single = _first_adapter(method)
            for row in decomposition(single, tokens, batch.n_prompt):
                result["decomposition"].append({"case": case["case"], **row.to_dict()})
    result["seconds"] = round(time.time() - t0, 1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_file, result)
    return result


def _first_adapter(method: Method) -> Method:
    """A single-adapter copy of a bank's adapter 0 on the same model."""
    from ctxtune.methods import make_method

    single = make_method(method.key, method.model, 1, **method.config.to_dict())
    state = {k: v[:1].clone() for k, v in method.adapter_state().items()}
    single.load_adapter_state(state)
    return single


def summarize(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_study` result."""
    lines = [
        "| case | method | layer | attention err | output err | fixed-bias unexplained | "
        "key dep. | value dep. | mean alpha |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decomposition"]:
        lines.append(
            f"| {r['case']} | {r['method']} | {r['layer'] + 1} | {r['attention_err']:.1e} | {r['output_err']:.1e} | "
            f"{r['fixed_bias_unexplained']:.3g} | {r['key_dependence']:.3g} | {r['value_dependence']:.3g} | "
            f"{r['mean_alpha']:.3f} |"
        )
    lines += [
        "",
        "| case | task | method | trainable | steps | accuracy per seed | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["learning"]:
        accs = ", ".join(f"{100 * a:.1f}%" for a in r["accuracy"])
        mean = 100 * sum(r["accuracy"]) / len(r["accuracy"])
        lines.append(
            f"| {r['case']} | {r['task']} | {r['method']} | {r['trainable']} | {r['steps']} | {accs} | {mean:.1f}% |"
        )
    return "\n".join(lines)
