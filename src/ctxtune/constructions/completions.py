"""Unique greedy completions of a real model: one hard first token against one virtual first token.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3, the LLaMA-7B experiment (companion notebook
llama_token_vs_soft_token.ipynb): 24,426 of 32,000 hard tokens (76.3%) and 46,812 of 48,218 soft tokens
(97.1%) gave unique 10-token greedy continuations. The authors' soft tokens came from a file of unknown
origin; here every pool has the same size as the hard pool and is drawn by a documented generator:

* "hard": every vocabulary id (or K drawn uniformly without replacement), no BOS.
* "gaussian": x ~ N(mu, Sigma) with mu, Sigma the mean and covariance of the input embedding matrix;
  x = mu + L z with L the Cholesky factor of Sigma (computed in float64, with a jitter if needed).
* "dirichlet": random convex mixes sum_j w_j E[t_j] of `MIX_SIZE` embeddings t_j drawn uniformly,
  weights w ~ Dirichlet(1, ..., 1); they stay inside the convex hull of the embeddings.

Greedy decoding is batched and KV-cached (one prefill of the single first position, then one token per
step through the cache). Each finished batch is appended to a JSON-lines file, so a killed run resumes
by skipping the batches already there.

Measured on SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), `--samples 2000 --length 10`,
seed 0: hard 1,228 / 2,000 unique (61.4%), gaussian 932 / 2,000 (46.6%), dirichlet 819 / 2,000 (41.0%).
Random virtual tokens give FEWER unique continuations than hard tokens here; the paper's 97.1% soft pool
was of unknown (possibly optimised) origin. Cost: about 3.2 CPU-seconds per batch of 64 x 10 tokens on
one thread, so 2,000 per pool (96 batches) is ~5 CPU-minutes and the full vocabulary (3 x 768 batches)
~2 CPU-hours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import CtxtuneError
from ctxtune.io import atomic_write_bytes

PAPER_LLAMA7B = {
    "model": "LLaMA-7B",
    "hard": {"unique": 24426, "n": 32000, "fraction": 0.763},
    "soft": {"unique": 46812, "n": 48218, "fraction": 0.971},
}
POOLS = ("hard", "gaussian", "dirichlet")
MIX_SIZE = 4  # embeddings per convex mix


def load_causal_lm(spec: str) -> Any:
    """A causal LM in eval mode, float32 (`smollm2`, a HF folder or a .gguf file), via ctxtune.hf
    (safetensors and GGUF only: nothing is unpickled)."""
    from ctxtune.hf.loading import load_model

    model, _ = load_model(spec, dtype=torch.float32)
    return model.eval()


def embedding_factor(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d_model] and Cholesky factor L [d_model, d_model] (Sigma = L L^T) of the rows, in float64."""
    e = emb.detach().double()  # [d_vocab, d_model]
    mean = e.mean(dim=0)
    centred = e - mean
    cov = centred.T @ centred / (e.shape[0] - 1)  # [d_model, d_model]
    jitter = 0.0
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
        if int(info) == 0:
            return mean, factor
        jitter = max(jitter * 10, 1e-10 * float(cov.diagonal().mean()))
    raise CtxtuneError("the embedding covariance is not positive definite even with jitter")


def make_pool(name: str, emb: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """First inputs of one pool: hard ids [n] (int64) or virtual tokens [n, d_model] (emb's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    d_vocab, d_model = emb.shape
    if name == "hard":
        return torch.arange(d_vocab) if n == d_vocab else torch.randperm(d_vocab, generator=gen)[:n]
    if name == "gaussian":
        mean, factor = embedding_factor(emb)
        z = torch.randn(n, d_model, generator=gen, dtype=torch.float64)  # [n, d_model]
        return (mean + z @ factor.T).to(emb.dtype)
    if name == "dirichlet":
        ids = torch.randint(0, d_vocab, (n, MIX_SIZE), generator=gen)  # [n, MIX_SIZE]
        w = -torch.rand(n, MIX_SIZE, generator=gen, dtype=torch.float64).log()  # Gamma(1) draws
        w = w / w.sum(dim=1, keepdim=True)  # Dirichlet(1, ..., 1)
        return torch.einsum("nk,nkd->nd", w, emb.detach().double()[ids]).to(emb.dtype)
    raise CtxtuneError(f"unknown pool {name!r}: expected one of {', '.join(POOLS)}")


@torch.no_grad()
def greedy_hf(model: Any, first: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy continuation [batch, length] of one first position, KV-cached.

    Args:
        model: a HF causal LM.
        first: hard ids [batch] or input embeddings [batch, d_model].
        length: new tokens.
    """
    if first.dtype == torch.long:
        out = model(input_ids=first[:, None], use_cache=True, logits_to_keep=1)
    else:
        out = model(inputs_embeds=first[:, None, :], use_cache=True, logits_to_keep=1)
    tokens = []
    for step in range(length):
        nxt = out.logits[:, -1].argmax(dim=-1)  # [batch]
        tokens.append(nxt)
        if step + 1 < length:
            out = model(input_ids=nxt[:, None], cache=out.past_key_values, use_cache=True, logits_to_keep=1)
    return torch.stack(tokens, dim=1)  # [batch, length]


def check_partial_results(path: Path) -> None:
    """Refuse an existing --out file that is not a partial-results file (before any model is loaded)."""
    if path.exists():
        _read_lines(path)


def _read_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the batch records of a partial-results file.

    A line that is not a complete record (cut by a kill) is skipped: its batch is redone.

    Raises:
        CtxtuneError: unreadable file, or a first line that is not this command's header.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtxtuneError(f"cannot read --out {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not lines:
        return {}, []
    try:
        first = json.loads(lines[0])
    except (ValueError, RecursionError):
        first = None
    if not (isinstance(first, dict) and isinstance(first.get("header"), dict)):
        raise CtxtuneError(f"--out {path} is not a `ctxtune completions` results file (no header line)")
    records = []
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by a kill: that batch is redone
            continue
        if isinstance(rec, dict) and rec.get("pool") in POOLS and isinstance(rec.get("batch"), int):
            if isinstance(rec.get("tokens"), list):
                records.append(rec)
    return first["header"], records


def _read_done(path: Path, header: dict[str, Any]) -> dict[tuple[str, int], list[list[int]]]:
    """Batches already in a JSON-lines file; the file's header must match this run's settings."""
    found, records = _read_lines(path)
    if not found and not records:
        return {}
    if found != header:
        raise CtxtuneError(f"{path} was written with other settings ({found}); use a new --out")
    return {(rec["pool"], rec["batch"]): rec["tokens"] for rec in records}


def _prepare_out(path: Path, header: dict[str, Any], done: dict[tuple[str, int], list[list[int]]]) -> None:
    """Write the file afresh (header and complete records) when it is new or ends in a cut line, so
    appended records always start on a line of their own."""
    if path.exists() and path.stat().st_size and path.read_bytes().endswith(b"\n"):
        return
    lines = [json.dumps({"header": header})]
    lines += [json.dumps({"pool": pool, "batch": i, "tokens": tokens}) for (pool, i), tokens in done.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, slice]]:
    for i, start in enumerate(range(0, n, batch_size)):
        yield i, slice(start, min(n, start + batch_size))


def count_completions(
    model: Any,
    samples: int | None = None,
    length: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
    model_name: str = "",
) -> dict[str, Any]:
    """Unique greedy continuations per pool (hard, gaussian, dirichlet), all pools of one size.

    Args:
        model: a HF causal LM (eval mode).
        samples: pool size K (default: the whole vocabulary).
        length: new tokens per continuation.
        batch_size: sequences per forward pass.
        seed: seed of the pools.
        out: JSON-lines file for partial results (resumed when it exists).
        progress: show a rich progress bar.
        model_name: recorded in the header and result.

    Returns:
        {"pools": {name: {"n", "unique", "fraction"}}, "paper": PAPER_LLAMA7B, ...}.
    """
    emb = model.get_input_embeddings().weight.detach()  # [d_vocab, d_model]
    d_vocab = emb.shape[0]
    n = d_vocab if samples is None else samples
    if not 1 <= n <= d_vocab:
        raise CtxtuneError(f"--samples must be in [1, {d_vocab}] (the vocabulary size), got {samples}")
    if length < 1 or batch_size < 1:
        raise CtxtuneError(f"--length and --batch-size must be at least 1, got {length} and {batch_size}")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and 1 + length > positions:
        raise CtxtuneError(f"--length {length} does not fit the model: a continuation takes 1 + {length} positions, "
                           f"the model has {positions}")
    header = {"model": model_name, "n": n, "length": length, "seed": seed, "batch_size": batch_size}
    done = _read_done(out, header) if out is not None and out.exists() else {}
    if out is not None:
        _prepare_out(out, header, done)
    start = time.perf_counter()
    results: dict[str, list[list[int]]] = {}
    n_batches = -(-n // batch_size)
    with _progress(progress) as bar:
        task = bar.add_task("completions", total=n_batches * len(POOLS)) if bar else None
        for k, name in enumerate(POOLS):
            pool = make_pool(name, emb, n, seed + k)
            rows: list[list[int]] = []
            for i, sl in _batches(n, batch_size):
                if (name, i) not in done:
                    tokens = greedy_hf(model, pool[sl], length).tolist()
                    done[(name, i)] = tokens
                    if out is not None:
                        with out.open("a") as fh:
                            fh.write(json.dumps({"pool": name, "batch": i, "tokens": tokens}) + "\n")
                rows.extend(done[(name, i)])
                if bar is not None and task is not None:
                    bar.update(task, advance=1, description=f"{name} {i + 1}/{n_batches}")
            results[name] = rows
    pools = {}
    for name, rows in results.items():
        unique = len({tuple(r) for r in rows})
        pools[name] = {"n": len(rows), "unique": unique, "fraction": unique / len(rows)}
    return {"model": model_name, "d_vocab": d_vocab, "samples": n, "length": length, "seed": seed,
            "pools": pools, "paper": PAPER_LLAMA7B, "seconds": round(time.perf_counter() - start, 2)}


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns)
