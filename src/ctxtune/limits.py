"""Upper bounds on sizes and counts, checked before any work or write.

Sizes are bounded by memory: each `*_bytes` function estimates what a model, a training run, a check
or a construction holds at its peak, counting only tensors that certainly exist at once (a lower
bound, so nothing that fits is refused), and `check_memory` refuses an estimate above this machine's
physical memory (`os.sysconf`), naming the estimate and the limit. Counts that memory does not bound
have constants here, each with its reason.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ctxtune.errors import ConfigError

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

#: Optimiser steps. ctxtune's longest schedule is 40,000 steps (the pretraining studies); 10 million is
#: 250 times that, days of CPU time even for the smallest model at a few milliseconds per step, so a
#: larger count is a typo (an extra zero or two) and would otherwise run until killed.
MAX_STEPS = 10_000_000

#: Seeds. Data streams use seed * 1000 + k + 500 and evaluation 1,000,003 * (seed + 1) + 17 as torch
#: generator seeds, which must stay below 2^64; 10^12 keeps every derived seed far inside that range.
MAX_SEED = 10**12

#: Test examples for an evaluation. Evaluation decodes every example; 10 million is over 3,000 times
#: the paper's 3,200, hours per evaluation, and past the number of distinct test inputs of most tasks.
MAX_EVAL_EXAMPLES = 10_000_000

#: Seeds of `ctxtune reproduce --seeds`. The paper reports 3 to 5 seeds; every seed is a full set of runs of every
#: study, so 1,000 seeds is thousands of runs and weeks of CPU time: a larger count is a typo.
MAX_SEEDS = 1000

#: Runs one sweep may plan. Each run is a folder and a row of the results store, and the plan is validated
#: run by run before anything starts; 10,000 is 40 times the largest study (a grid that expands past it is
#: a combinatorial accident, e.g. two long option lists multiplied).
MAX_PLAN_RUNS = 10_000

#: Examples per greedy-decoding batch in `ctxtune.train.evaluate.evaluate` (its default batch_size).
EVAL_BATCH = 1600


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n_bytes: float) -> str:
    """'12.3 GiB' (or '1.2e+06 GiB' for absurd sizes)."""
    value = n_bytes / 2**30
    return f"{value:.3g} GiB" if value < 1e5 else f"{value:.2g} GiB"


def check_memory(need: int, what: str, detail: str = "", limit: int | None = None) -> None:
    """Refuse `need` bytes when they exceed `limit` (default: this machine's physical memory).

    Raises:
        ConfigError: "{what} needs at least about N GiB ({detail}), more than this machine's M GiB of memory".
    """
    limit = physical_memory() if limit is None else limit
    if need > limit:
        extra = f" ({detail})" if detail else ""
        raise ConfigError(
            f"{what} needs at least about {gib(need)}{extra}, more than this machine's {gib(limit)} of memory"
        )


def check_threads(value: int, name: str) -> None:
    """Refuse a torch thread count below 1 or above this machine's CPU count, naming the flag."""
    cores = os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cores:
        raise ConfigError(f"{name} must be an integer from 1 to this machine's {cores} CPU(s), got {value!r}")


def check_seed(value: int, name: str = "--seed") -> None:
    """Refuse a seed below 0 or above MAX_SEED (derived seeds must stay inside 64 bits), naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer from 0 to {MAX_SEED:,}, got {value!r}")


def check_int64(value: Any, name: str) -> None:
    """Refuse an integer that does not fit in a signed 64-bit integer (torch's int64), naming it."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}...({len(str(value))} digits)"
        raise ConfigError(f"{name} = {shown} does not fit in a 64-bit integer")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) with a finite value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_finite(value: Any, name: str) -> None:
    """Refuse a float that is NaN or infinite, naming it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")


# ----- model, training and evaluation ------------------------------------------------------------
def norm_parameters(kind: str, d_model: int) -> int:
    """Parameters of one norm site: LayerNorm has a weight and a bias, RMSNorm a weight, none nothing."""
    return {"layernorm": 2 * d_model, "rmsnorm": d_model}.get(kind, 0)


def model_parameters(cfg: Any) -> int:
    """Unique parameters of `GPT(cfg)` in closed form (tied embeddings once), without building it."""
    d, inner, m, bias = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.mlp_dim, int(cfg.bias)
    attn = 3 * (d * inner + inner * bias) + inner * d + d * bias
    attn_norm = norm_parameters(cfg.norm, d) if cfg.attn_norm else 0
    mlp = (d * m + m * bias + m * d + d * bias + norm_parameters(cfg.norm, d)) if cfg.mlp else 0
    block = attn_norm + attn + mlp
    embed = cfg.d_vocab * d + (cfg.n_ctx * d if cfg.pos == "learned" else 0)
    unembed = 0 if cfg.tie_embeddings else d * cfg.d_vocab
    return embed + cfg.n_layers * block + norm_parameters(cfg.norm, d) + unembed


def training_bytes(
    cfg: Any,
    n_trainable: int,
    trains_model: bool,
    rows: int,
    positions: int,
    prefix_keys: int,
    eval_rows: int,
    element_size: int = 4,
) -> tuple[int, str]:
    """Peak bytes of a training run and its greedy evaluation, with a description of the parts.

    Counted: model weights; trainable tensors (unless they are the model's) with their gradient and
    AdamW's two moments; the activations one step keeps for backward (per layer the normed input, q, k,
    v, attention output, projections, residual and MLP hidden states; keys and values concatenated
    with prefix keys; logits and their log-softmax); the key/value cache greedy evaluation holds for
    every layer; the boolean causal mask [positions, positions + prefix keys]. Attention matrices are
    not counted (the fused kernel may not store them).

    Args:
        cfg: the ModelConfig.
        n_trainable: trainable parameters (whole bank).
        trains_model: the trainable parameters are the model's own (full fine-tuning, pretraining).
        rows: sequences per step (adapters x batch size).
        positions: positions each sequence occupies (placeholders, input, output, spliced virtual tokens).
        prefix_keys: prefix keys every layer attends to (prefix methods' n_virtual, else 0).
        eval_rows: sequences per evaluation batch.
        element_size: bytes per parameter (4 for float32).
    """
    d, inner, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_layers
    m = cfg.mlp_dim if cfg.mlp else 0
    weights = model_parameters(cfg) + (0 if trains_model else n_trainable)
    optimizer = 3 * n_trainable
    per_layer = rows * positions * (4 * d + 4 * inner + 2 * m)
    if prefix_keys:
        per_layer += 2 * rows * (positions + prefix_keys) * inner
    activations = L * per_layer + rows * positions * (d + 2 * cfg.d_vocab)
    kv_cache = L * 2 * eval_rows * (positions + prefix_keys) * inner
    mask = positions * (positions + prefix_keys)  # the causal mask, one byte per (query, key)
    total = element_size * (weights + optimizer + max(activations, kv_cache)) + mask
    detail = (
        f"weights {gib(element_size * weights)}, optimiser {gib(element_size * optimizer)}, "
        f"activations of {rows} x {positions} positions {gib(element_size * activations)}, "
        f"evaluation cache of {eval_rows} x {positions + prefix_keys} keys {gib(element_size * kv_cache)}, "
        f"attention mask {gib(mask)}"
    )
    return total, detail


def attention_check_bytes(
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_head: int,
    length: int,
    n_inputs: int,
    n_tokens: int,
    element_size: int = 8,
) -> int:
    """Bytes `ctxtune check attention` holds for a random prefix of `length` virtual tokens.

    Counted, per layer: the prefix (hidden states, or keys and values), the captured keys and values
    with the prefix keys concatenated, and the captured attention scores and pattern
    [n_inputs, n_heads, n_tokens, length + n_tokens]. The model's own weights are not counted (the
    caller knows them; for a run folder add `model_parameters(cfg) * element_size`).
    """
    keys = length + n_tokens
    prefix = max(d_model, 2 * n_heads * d_head) * length
    captured = 2 * n_inputs * keys * n_heads * d_head + 2 * n_inputs * n_heads * n_tokens * keys
    return element_size * n_layers * (prefix + captured)


def check_attention_fits(
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_head: int,
    length: int,
    n_inputs: int = 2,
    n_tokens: int = 12,
    element_size: int = 8,
    limit: int | None = None,
) -> None:
    """Refuse a `check attention --length` whose prefix and captures cannot fit in memory.

    Call it from `ctxtune check attention` once the model's shape is known, before building the prefix.
    """
    need = attention_check_bytes(n_layers, d_model, n_heads, d_head, length, n_inputs, n_tokens, element_size)
    check_memory(need, f"check attention --length {length}", f"{n_layers} layers of {length} prefix keys", limit)
