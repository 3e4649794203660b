"""`ctxtune check attention`: the Section 4 identity at every layer and head of a model.

Checks (per layer and head, on the inputs the adapted model sees and the same content position ids):
renormalised content attention, output reconstruction, bias in the span of the prefix values, and two
negative controls that must fail (perturbed alpha; a weight-updated copy of the layer's attention).
The cross-layer change against the base model's own inputs is reported separately, never as a check.

Which adapter: `--adapter PATH` (a PEFT adapter folder or a ctxtune run folder, see
`ctxtune.commands.adapters`), or the trained adapter of a run folder given as `--model`, or else a seeded
random one (`--method`, `--length`). What is checked follows the adapter's method (its `identity` fact):
"holds" (prefix, prefix_kv, soft prompt, ...): the identity checks on the TRAINED adapter; "none" (LoRA, full
fine-tuning): the identity does not apply, and is reported so; the weight control runs instead: the base's
and the trained attention on the same layer inputs, where a change of relative attention (q or k adapted) and
of the head outputs (q, k or v adapted) is expected and its size is reported as a margin over the tolerance
a prefix passes at. "partial" (suffix): refused, with where to look instead.
Exit code 0: every check has its expected outcome; 1: one does not; 2: bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import CtxtuneError
from ctxtune.limits import check_seed
from ctxtune.theory.capture import LayerAttention
from ctxtune.theory.cross_layer import CrossLayerChange
from ctxtune.theory.identity import CHECK_KEYS, N_INPUTS, N_TOKENS, context_report, expected_moves, status
from ctxtune.theory.identity import weight_report as theory_weight_report
from ctxtune.train.runs import is_run_folder


def context_methods() -> tuple[str, ...]:
    """Methods `check attention` can build with P virtual tokens: virtual keys/values before the content
    (the Section 4 identity applies) and an `n_virtual` option (method facts, not a list kept here)."""
    from dataclasses import fields

    from ctxtune.methods import get_method_class, list_methods

    return tuple(k for k in list_methods() if get_method_class(k).identity == "holds"
                 and "n_virtual" in {f.name for f in fields(get_method_class(k).config_cls)})
DTYPES = {"float32": torch.float32, "float64": torch.float64}

check_app = typer.Typer(help="Executable checks of the paper's theory.", no_args_is_help=True)


def check_fits(model: Any, length: int, dtype: torch.dtype) -> None:
    """Refuse a prefix of `length` whose captured keys, values and patterns cannot fit in memory (limits.py)."""
    from ctxtune.limits import check_attention_fits

    cfg = model.cfg
    d_head = getattr(cfg, "head_dim", 0) or cfg.d_model // cfg.n_heads
    check_attention_fits(cfg.n_layers, cfg.d_model, cfg.n_heads, d_head, length, N_INPUTS, N_TOKENS,
                         torch.finfo(dtype).bits // 8)


def _random_adapter(spec: str, method_key: str | None, length: int, seed: int, dtype: torch.dtype) -> tuple:
    """(model, a seeded random context method of `length` virtual tokens) on a run's or a Hugging Face model."""
    from ctxtune.methods import make_method
    from ctxtune.train.runs import load_run_model

    if is_run_folder(spec):
        model = load_run_model(spec).to(dtype).eval()
    else:
        from ctxtune.hf.backbone import load_backbone

        model = load_backbone(spec, dtype)
    check_fits(model, length, dtype)
    method = make_method(method_key or "prefix", model, n_virtual=length)
    method.init_adapter(0, torch.Generator().manual_seed(seed))
    return model, method.to(dtype)


def _trained_adapter(model: str | None, adapter: str | None, index: int, dtype: torch.dtype) -> Any:
    """The adapter to check, when there is a trained one: --adapter, or the adapter of a tune run given as --model."""
    from ctxtune.commands.adapters import open_adapter
    from ctxtune.train.runs import read_run

    if adapter is not None:
        return open_adapter(adapter, model, index, dtype)
    if model is not None and is_run_folder(model) and read_run(model).spec.kind == "tune":
        return open_adapter(model, None, index, dtype)  # never a random prefix on a run that trained something
    return None


def weight_report(adapter: Any, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """The weight control of a trained weight method: base vs trained attention on the base's layer inputs."""
    return theory_weight_report(adapter.method, adapter.load_base(dtype), seed)


def run_checks(model: str | None, method: str | None, length: int, seed: int, dtype: str,
               adapter: str | None = None, index: int = 0) -> dict[str, Any]:
    """Everything `check attention` reports, as one JSON-ready dict."""
    if model is None and adapter is None:
        raise CtxtuneError("give --model (a run folder or a Hugging Face model), --adapter, or both")
    if method is not None and method not in context_methods():
        raise CtxtuneError(f"--method must be one of {', '.join(context_methods())}, got {method!r}")
    if length < 1:
        raise CtxtuneError(f"--length must be at least 1, got {length}")
    check_seed(seed)
    if dtype not in DTYPES:
        raise CtxtuneError(f"--dtype must be float32 or float64, got {dtype!r}")
    if index < 0:
        raise CtxtuneError(f"--index must be non-negative, got {index}")
    model = str(Path(model).expanduser()) if model not in (None, "smollm2") else model
    with torch.no_grad():
        trained = _trained_adapter(model, adapter, index, DTYPES[dtype])
        if trained is not None and method is not None:
            raise CtxtuneError(f"--method describes a random adapter; {trained.path} is a trained {trained.key} "
                               "adapter")
        if trained is None:
            report = context_report(_random_adapter(model, method, length, seed, DTYPES[dtype])[1], seed)
        elif trained.identity == "holds":
            report = context_report(trained.method, seed)
        elif trained.identity == "none":
            report = weight_report(trained, DTYPES[dtype], seed)
        else:
            raise CtxtuneError(f"{trained.path} is a {trained.key} adapter: the Section 4 identity holds only partly "
                               "for it (relative attention yes, the fixed-values bias no); see the decomposition "
                               "analysis (docs/suffix-vs-prefix.md)")
    where = {"model": trained.base if trained is not None else model, "adapter": trained.path if trained else None,
             "adapter_description": trained.description if trained else f"random, seed {seed}"}
    return {**where, "dtype": dtype, "status": status(report), **report}


def _table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    kinds = [
        "attention",
        "output",
        "span",
        "control_alpha",
        "control_weights_attention",
        "control_weights_output",
    ]
    table = Table(
        title=f"{report['model']}: {report['method']} P={report['length']} {report['dtype']} (worst head)"
    )
    table.add_column("layer", justify="right")
    for k in ("attn", "out", "span"):
        table.add_column(f"{k} err", justify="right")
    table.add_column("alpha min/med/max", justify="right")
    table.add_column("ctrl err/tol", justify="right")
    table.add_column("cross dA", justify="right")
    table.add_column("ok")
    n_layers = 1 + max(c["layer"] for c in report["checks"])
    for layer in range(n_layers):
        rows = [c for c in report["checks"] if c["layer"] == layer]
        worst = {
            k: max((c["max_abs_err"] for c in rows if c["kind"] == k), default=float("nan"))
            for k in kinds[:3]
        }
        ctrl = min((c["max_abs_err"] / c["tol"] for c in rows if c["control"]), default=float("nan"))
        al = [a for a in report["alpha"] if a["layer"] == layer]
        cross = max(
            (c["max_abs_change"] for c in report["cross_layer"] if c["layer"] == layer), default=float("nan")
        )
        ok = all(c["passed"] != c["control"] for c in rows)
        table.add_row(
            str(layer),
            *(f"{worst[k]:.1e}" for k in kinds[:3]),
            f"{min(a['min'] for a in al):.3f}/{sorted(a['median'] for a in al)[len(al) // 2]:.3f}/"
            f"{max(a['max'] for a in al):.3f}",
            f"{ctrl:.1e}",
            f"{cross:.2e}",
            "[green]yes[/]" if ok else "[red]NO[/]",
        )
    return table


def _weight_table(report: dict[str, Any]) -> Any:
    """Per layer: how far the trained weights move attention and head outputs (largest head), in tolerances."""
    from rich.table import Table

    table = Table(title=f"{report['model']} + {report['adapter_description']}: weight control, {report['dtype']} "
                  "(worst head)")
    for name in ("layer", "attention moved", "x tol", "outputs moved", "x tol", "must move"):
        table.add_column(name, justify="right")
    table.add_column("ok")
    moves = report["weight_control"]["expected_to_move"]
    for layer in range(1 + max(c["layer"] for c in report["checks"])):
        rows = [c for c in report["checks"] if c["layer"] == layer]
        cells = []
        for kind in ("control_weights_attention", "control_weights_output"):
            worst = max((c for c in rows if c["kind"] == kind), key=lambda c: c["margin"])
            cells += [f"{worst['max_abs_err']:.2e}", f"{worst['margin']:.1e}"]
        wanted = "+".join(w for w, k in (("attn", "control_weights_attention"), ("out", "control_weights_output"))
                          if moves[k]) or "-"
        table.add_row(str(layer), *cells, wanted, "[green]yes[/]" if all(c["ok"] for c in rows) else "[red]NO[/]")
    return table


def print_report(report: dict[str, Any]) -> None:
    """The table and the verdict lines of `check attention`."""
    from rich.console import Console

    console = Console()
    if report["identity"] == "none":
        console.print(_weight_table(report))
        margin = report["weight_control"]["max_margin"]
        console.print(
            f"{report['method']} changes weights: the Section 4 identity does not apply (it is about virtual tokens "
            "before the content). Weight control instead: on the same layer inputs the trained weights move "
            f"relative attention up to {margin['control_weights_attention']:.1e} x and head outputs up to "
            f"{margin['control_weights_output']:.1e} x the tolerance a prefix passes within."
        )
        colour = "yellow" if report["passed"] else "red"
        console.print(f"[{colour}]{report['status']}[/]")
        return
    console.print(_table(report))
    console.print("cross-layer dA: max |renormalised attention - base model's own attention| (not a check)")
    console.print(
        f"adapter: {report['adapter_description']}; "
        + ("[green]all checks as expected[/]" if report["passed"] else "[red]some checks failed[/]")
    )


@check_app.command("attention")
@cli_errors
def attention(
    model: str = typer.Option(None, "--model", help="run folder, HF folder, .gguf file, or 'smollm2' (the base of a "
                              "PEFT --adapter)"),
    adapter: str = typer.Option(None, "--adapter", help="a trained adapter: a PEFT adapter folder (prefix tuning, "
                                "prompt tuning, LoRA) or a ctxtune run folder"),
    index: int = typer.Option(0, "--index", help="which adapter of a run's bank"),
    method: str = typer.Option(
        None, "--method", help="random adapter: prefix | prefix_kv | soft_prompt (default prefix)"
    ),
    length: int = typer.Option(1, "--length", help="number of virtual tokens P of a random adapter"),
    seed: int = typer.Option(0, "--seed", help="seed of the random adapter, inputs and weight control"),
    dtype: str = typer.Option("float64", "--dtype", help="float32 | float64"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
) -> None:
    """Check that a prefix only rescales content attention and biases each head's output.

    With --adapter (or a tune run as --model) the TRAINED adapter is checked; a weight method (LoRA, full
    fine-tuning) is reported as "the identity does not apply" with the weight control instead. Without one a
    seeded random adapter is used. The cross-layer column compares with the base model's OWN inputs and is
    information, not a check.

    Example: ctxtune check attention --model smollm2 --method prefix_kv --length 10 --dtype float32

    Example: ctxtune check attention --model models/llama --adapter adapters/lora
    """
    report = run_checks(model, method, length, seed, dtype, adapter, index)
    if as_json:
        emit_json(report)
    else:
        print_report(report)
    if not report["passed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `check` command group to the ctxtune app."""
    app.add_typer(check_app, name="check")


__all__ = ["CHECK_KEYS", "CrossLayerChange", "LayerAttention", "context_report", "expected_moves", "register",
           "run_checks", "status", "weight_report"]
