"""Capacity counting for the hand-built constructions, the mechanism check and the precision search.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3. With greedy decoding a hard first token yields
at most V completions (V maps, for conditional generation); one virtual token reaches every one of the
V^N sequences (V^(V N) maps). `count_capacity` enumerates every target when there are at most
`MAX_EXHAUSTIVE` (or samples K of them), counts how many the model reaches, and counts the distinct
completions of the V hard first tokens in the same model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ctxtune.constructions.decoding import Construction
from ctxtune.errors import ConfigError, CtxtuneError
from ctxtune.limits import check_memory, model_parameters
from ctxtune.model.config import ModelConfig

MAX_EXHAUSTIVE = 100_000  # enumerate all targets up to this many; beyond, --samples is required
MAX_LOGITS = 2**24  # batch * V elements per decoding step (memory cap for large V)


@dataclass
class CapacityResult:
    """Counts of one capacity run (serialisable with `to_dict`)."""

    construction: str
    form: str
    vocab: int
    length: int
    dtype: str
    exhaustive: bool
    total: int  # targets tried
    reached: int  # targets whose greedy output equals the reference
    n_targets: int  # targets that exist: V^N or V^(V N)
    hard_token_completions: int  # distinct outputs of the V hard first tokens (<= V)
    constants: dict[str, float] = field(default_factory=dict)
    attention: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """Plain values; `n_targets` is null beyond 10^1000 (printing it would take thousands of digits) and
        `n_targets_log10` always gives its size."""
        out = asdict(self)
        out["n_targets_log10"] = log10_int(self.n_targets)
        if out["n_targets_log10"] > 1000:
            out["n_targets"] = None
        return out


def log10_int(n: int) -> float:
    """log10 of a positive int of any size (float(n) overflows beyond about 10^308)."""
    shift = max(0, n.bit_length() - 64)
    return math.log10(n >> shift) + shift * math.log10(2)


def capped_power(base: int, exponent: int, cap: int) -> int:
    """min(base ** exponent, cap) without computing a power of millions of digits."""
    return base**exponent if exponent * math.log2(base) < math.log2(cap) + 1 else cap


def magnitude(n: int) -> str:
    """'1.23e+05' for ordinary counts, '10^3000.0' for counts too large for a float."""
    exponent = log10_int(n)
    return f"{n:.3g}" if exponent < 300 else f"10^{exponent:.1f}"


def construction_bytes(
    cfg: ModelConfig, dtype: torch.dtype, decode_rows: int, positions: int, target_values: int
) -> int:
    """Peak bytes of building a construction and counting its capacity.

    Counted: the weights, built in float32 and cast to float64 while written (12 bytes each); the KV
    cache of the largest greedy-decoding batch (`decode_rows` sequences of `positions`); the int64
    targets (`target_values` token ids).
    """
    element = torch.empty((), dtype=dtype).element_size()
    inner = cfg.n_heads * cfg.head_dim
    cache = cfg.n_layers * 2 * decode_rows * positions * inner * element
    return 12 * model_parameters(cfg) + cache + 8 * target_values


def check_construction_fits(
    construction: str, form: str, vocab: int, length: int, dtype: torch.dtype, samples: int | None
) -> None:
    """Refuse a construction (and capacity count) that cannot fit in memory, before building anything.

    Raises:
        ConfigError: naming --vocab, --length (and --samples), the estimate and the machine's memory.
    """
    from ctxtune.constructions.conditional import c_config
    from ctxtune.constructions.unconditional import authors_config, u_config

    what = f"construct {construction} --vocab {vocab} --length {length}"
    conditional = construction == "conditional"
    shape = c_config if conditional else authors_config if form == "authors" else u_config
    try:
        cfg = shape(vocab, length)
    except ConfigError as exc:  # the model's own weights alone do not fit
        raise ConfigError(f"{what}: {exc}") from None
    per_target = vocab * (vocab if conditional else 1)  # logits per decoding step per target
    batch = max(1, min(4096, MAX_LOGITS // per_target))  # as count_reached
    n = capped_power(vocab, length * (vocab if conditional else 1), MAX_EXHAUSTIVE) if samples is None else samples
    rows = max(min(batch, n), vocab) * (vocab if conditional else 1)  # a capacity batch, or the V hard tokens
    need = construction_bytes(cfg, dtype, rows, length + 2, n * length * (vocab if conditional else 1))
    detail = f"a {cfg.n_layers}-layer model of width {cfg.d_model} and {n:,} targets"
    check_memory(need, what + (f" --samples {samples}" if samples is not None else ""), detail)


def count_reached(c: Construction, targets: torch.Tensor, batch_size: int | None = None) -> int:
    """How many targets the construction reproduces exactly (batched greedy decoding)."""
    if batch_size is None:
        per_target = c.vocab * (c.vocab if c.name == "conditional" else 1)  # logits per step per target
        batch_size = max(1, min(4096, MAX_LOGITS // per_target))
    reached = 0
    for start in range(0, targets.shape[0], batch_size):
        chunk = targets[start : start + batch_size]
        ok = (c.run(chunk) == c.reference(chunk)).reshape(chunk.shape[0], -1).all(dim=1)  # [batch]
        reached += int(ok.sum())
    return reached


def count_hard_completions(c: Construction) -> int:
    """Distinct outputs (sequences, or maps for conditional) over the V hard first tokens."""
    out = c.run_hard().reshape(c.vocab, -1)  # [V, N] or [V, V*N]
    return int(torch.unique(out, dim=0).shape[0])


def intended_attention(c: Construction, targets: torch.Tensor) -> dict[str, float]:
    """The mechanism: attention on the keys the proof intends, on the teacher-forced target sequences.

    Returns the smallest attention mass on the intended key per head ("authors" and conditional), or
    the largest deviation from uniform attention (construction U, where H = 0).
    """
    model = c.model
    vt = c.virtual_tokens(targets)  # [batch, d_model]
    if c.name == "unconditional":
        rest = model.embed(targets[:, :-1].long())  # [batch, N-1, d_model]
        embeds = torch.cat([vt[:, None], rest], dim=1)  # [batch, N, d_model]
    else:
        user = torch.zeros(targets.shape[0], dtype=torch.long)  # user token 0, output row f(0)
        follow = targets[:, 0, :-1].long()  # [batch, N-1]
        seq = torch.cat([user[:, None], follow], dim=1)  # [batch, N]
        embeds = torch.cat([vt[:, None], model.embed(seq)], dim=1)  # [batch, N+1, d_model]
    with torch.no_grad():
        _, cache = model.run_with_cache(embeds=embeds, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, n_heads, pos, pos]
    pos = pattern.shape[-1]
    if c.name == "unconditional" and c.form == "residual":
        uniform = torch.tril(torch.ones(pos, pos, dtype=pattern.dtype))
        uniform = uniform / uniform.sum(dim=-1, keepdim=True)  # [pos, pos]
        return {"max_uniform_error": float((pattern[:, 0] - uniform).abs().max())}
    if c.name == "unconditional":
        diag = torch.diagonal(pattern[:, 0], dim1=-2, dim2=-1)  # [batch, pos]
        first = pattern[:, 1, :, 0]  # [batch, pos]
        return {"min_mass_pos_self": float(diag.min()), "min_mass_first_key0": float(first.min())}
    return {
        "min_mass_table_key0": float(pattern[:, 0, :, 0].min()),
        "min_mass_user_key1": float(pattern[:, 1, 1:, 1].min()),
    }


def count_capacity(c: Construction, samples: int | None = None, seed: int = 0) -> CapacityResult:
    """Count reached targets (all of them, or `samples` drawn uniformly) and hard-token completions.

    Raises:
        CtxtuneError: too many targets to enumerate and no `samples` given, or samples < 1.
    """
    start = time.perf_counter()
    if samples is not None and samples < 1:
        raise CtxtuneError(f"--samples must be at least 1, got {samples}")
    if samples is None:
        if c.n_targets > MAX_EXHAUSTIVE:
            raise CtxtuneError(
                f"{c.name} V={c.vocab} N={c.length} has {magnitude(c.n_targets)} targets, more than "
                f"{MAX_EXHAUSTIVE:,} to enumerate; pass --samples K"
            )
        targets = c.all_targets()
    else:
        targets = c.random_targets(samples, torch.Generator().manual_seed(seed))
    reached = count_reached(c, targets)
    return CapacityResult(
        construction=c.name,
        form=c.form,
        vocab=c.vocab,
        length=c.length,
        dtype=str(c.dtype).removeprefix("torch."),
        exhaustive=samples is None,
        total=int(targets.shape[0]),
        reached=reached,
        n_targets=c.n_targets,
        hard_token_completions=count_hard_completions(c),
        constants=dict(c.constants),
        attention=intended_attention(c, targets[: min(256, targets.shape[0])]),
        seconds=time.perf_counter() - start,
    )


def _extreme_targets(c: Construction, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random targets plus the all-0 and all-(V-1) targets (the edges of the grid)."""
    rand = c.random_targets(n, generator)
    return torch.cat([torch.zeros_like(rand[:1]), torch.full_like(rand[:1], c.vocab - 1), rand])


def find_precision_limit(
    make: Callable[[int, int], Construction],
    sizes: Sequence[tuple[int, int]],
    samples: int = 64,
    seed: int = 0,
) -> dict[str, object]:
    """Walk `sizes` (V, N) in order; return the last size whose sampled targets all pass and the first
    failure (None if every size passes).

    Args:
        make: builds a construction of a given (V, N), e.g. `lambda v, n: make_unconditional(v, n,
            dtype=torch.float32)`.
        sizes: (V, N) pairs, growing.
        samples: random targets per size (the two extreme targets are always added).
        seed: generator seed.
    """
    generator = torch.Generator().manual_seed(seed)
    largest: tuple[int, int] | None = None
    for vocab, length in sizes:
        c = make(vocab, length)
        targets = _extreme_targets(c, samples, generator)
        reached = count_reached(c, targets)
        if reached < targets.shape[0]:
            failed = targets.shape[0] - reached
            return {"largest": largest, "first_failure": (vocab, length), "failed": failed}
        largest = (vocab, length)
    return {"largest": largest, "first_failure": None, "failed": 0}
