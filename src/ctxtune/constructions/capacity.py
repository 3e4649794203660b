"""Capacity counting for the hand-built constructions, the mechanism check and the precision search.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3. With greedy decoding a hard first token yields
at most V completions (V maps, for conditional generation); one virtual token reaches every one of the
V^N sequences (V^(V N) maps). `count_capacity` enumerates every target when there are at most
`MAX_EXHAUSTIVE` (or samples K of them), counts how many the model reaches, and counts the distinct
completions of the V hard first tokens in the same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ctxtune.constructions.decoding import Construction
from ctxtune.errors import CtxtuneError

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
        return asdict(self)


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
                f"{c.name} V={c.vocab} N={c.length} has {c.n_targets:.3g} targets, more than "
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
