"""`ctxtune construct` (capacity of the hand-built constructions) and `ctxtune completions` (unique
greedy completions of a real model from hard vs virtual first tokens). Paper Section 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from ctxtune.commands.common import check_output_path, cli_errors, emit_json
from ctxtune.errors import CtxtuneError
from ctxtune.limits import check_seed

app = typer.Typer(help="Section 3: one virtual token against one hard token.", no_args_is_help=True)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def register(app: typer.Typer) -> None:
    """Add `construct` and `completions` to a Typer app."""
    app.command("construct")(construct_cmd)
    app.command("completions")(completions_cmd)


def run_construct(
    construction: str,
    vocab: int,
    length: int,
    samples: int | None = None,
    seed: int = 0,
    form: str | None = None,
    dtype: str = "float64",
    verify: bool = False,
) -> dict[str, Any]:
    """Build a construction and count reached targets and hard-token completions (one JSON-able dict).

    Raises:
        CtxtuneError: unknown construction, form or dtype; vocab < 2; length < 1; too many targets for
            exhaustive counting without samples; with `verify`, a target that is not reached.
    """
    from ctxtune.constructions import count_capacity, make_conditional, make_unconditional
    from ctxtune.constructions.capacity import check_construction_fits

    check_seed(seed)

    check_construct_args(construction, vocab, length, samples, form, dtype)
    check_construction_fits(construction, form or "residual", vocab, length, DTYPES[dtype], samples)
    if construction == "unconditional":
        c = make_unconditional(vocab, length, form=form or "residual", dtype=DTYPES[dtype])
    else:
        c = make_conditional(vocab, length, dtype=DTYPES[dtype])
    result = count_capacity(c, samples=samples, seed=seed).to_dict()
    result["verified"] = result["reached"] == result["total"]
    if verify and not result["verified"]:
        raise CtxtuneError(f"verification failed: {result['reached']} of {result['total']} targets reached")
    return result


def check_construct_args(
    construction: str, vocab: int, length: int, samples: int | None, form: str | None, dtype: str
) -> None:
    """Names, forms and ranges of `construct`'s arguments (sizes against memory come next)."""
    if dtype not in DTYPES:
        raise CtxtuneError(f"unknown --dtype {dtype!r}: expected float32 or float64")
    if construction not in ("unconditional", "conditional"):
        raise CtxtuneError(f"unknown construction {construction!r}: expected unconditional or conditional")
    if construction == "conditional" and form not in (None, "residual"):
        raise CtxtuneError(f"conditional has only the residual form (construction C), got --form {form}")
    if form not in (None, "residual", "authors"):
        raise CtxtuneError(f"unknown --form {form!r}: expected 'authors' or 'residual'")
    if vocab < 2 or length < 1:
        raise CtxtuneError(f"--vocab must be at least 2 and --length at least 1, got {vocab} and {length}")
    if samples is not None and samples < 1:
        raise CtxtuneError(f"--samples must be at least 1, got {samples}")


@cli_errors
def construct_cmd(
    construction: str = typer.Argument(..., help="unconditional or conditional."),
    vocab: int = typer.Option(..., "--vocab", help="Vocabulary size V (>= 2)."),
    length: int = typer.Option(..., "--length", help="Generated length N (>= 1)."),
    verify: bool = typer.Option(False, help="Exit with an error unless every target is reached."),
    samples: int = typer.Option(None, help="Sample K targets uniformly instead of enumerating all."),
    seed: int = typer.Option(0, help="Seed for --samples."),
    form: str = typer.Option(None, help="authors (two heads, width 2N) or residual (U, default)."),
    dtype: str = typer.Option("float64", help="float32 or float64."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Count the targets one virtual token reaches in a hand-built GPT, and the hard-token completions.

    Example: ctxtune construct unconditional --vocab 5 --length 4 --verify --json
    """
    result = run_construct(construction, vocab, length, samples, seed, form, dtype, verify)
    _report(json_out, result)


def run_completions(
    model: str = "smollm2",
    samples: int | None = None,
    length: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
    lm: Any = None,
) -> dict[str, Any]:
    """Check the arguments and the output file, then load `model` (unless `lm` is given) and count
    unique completions per pool."""
    from ctxtune.constructions.completions import check_partial_results, count_completions, load_causal_lm

    if samples is not None and samples < 1:
        raise CtxtuneError(f"--samples must be at least 1, got {samples}")
    check_seed(seed)
    if length < 1 or batch_size < 1:
        raise CtxtuneError(f"--length and --batch-size must be at least 1, got {length} and {batch_size}")
    if out is not None:
        check_output_path(out, "--out", "file")
        check_partial_results(out)
    torch.manual_seed(seed)
    if lm is None:
        lm = load_causal_lm(model)
    return count_completions(lm, samples=samples, length=length, batch_size=batch_size, seed=seed, out=out,
                             progress=progress, model_name=model)


@cli_errors
def completions_cmd(
    model: str = typer.Option("smollm2", help="smollm2, a HF model folder or a .gguf file."),
    samples: int = typer.Option(None, help="K first tokens per pool (default: the whole vocabulary)."),
    length: int = typer.Option(10, help="New tokens per continuation."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forward pass."),
    seed: int = typer.Option(0, help="Seed of the sampled pools."),
    out: Path = typer.Option(None, help="JSON-lines file of partial results; rerun to resume."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Unique greedy continuations from hard first tokens vs Gaussian and convex-mix virtual tokens.

    Example: ctxtune completions --model smollm2 --samples 2000 --out runs/completions.jsonl --json
    """
    show = not quiet and not json_out
    result = run_completions(model, samples, length, batch_size, seed, out, progress=show)
    _report(json_out, result)


def _report(json_out: bool, payload: dict[str, Any]) -> None:
    if json_out:
        emit_json(payload)
        return
    from rich.console import Console

    console = Console()
    for key, value in payload.items():
        console.print(f"[bold]{key}[/bold]: {value}")


register(app)
