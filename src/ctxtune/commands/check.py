"""`ctxtune check attention`: the Section 4 identity at every layer and head of a model.

Checks (per layer and head, on the inputs the adapted model sees and the same content position ids):
renormalised content attention, output reconstruction, bias in the span of the prefix values, and two
negative controls that must fail (perturbed alpha; a weight-updated copy of the layer's attention).
The cross-layer change against the base model's own inputs is reported separately, never as a check.
Exit code 0: every check has its expected outcome; 1: one does not; 2: bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import CtxtuneError
from ctxtune.theory.attention import (
    CheckResult,
    alpha_stats,
    check_layers,
    check_weights_control,
    perturbed_copy,
)
from ctxtune.theory.capture import LayerAttention
from ctxtune.theory.cross_layer import CrossLayerChange, cross_layer_changes
from ctxtune.train.runs import is_run_folder


def context_methods() -> tuple[str, ...]:
    """Methods `check attention` can build with P virtual tokens: virtual keys/values before the content
    (the Section 4 identity applies) and an `n_virtual` option (method facts, not a list kept here)."""
    from dataclasses import fields

    from ctxtune.methods import get_method_class, list_methods

    return tuple(k for k in list_methods() if get_method_class(k).identity == "holds"
                 and "n_virtual" in {f.name for f in fields(get_method_class(k).config_cls)})
DTYPES = {"float32": torch.float32, "float64": torch.float64}
N_INPUTS, N_TOKENS = 2, 12

check_app = typer.Typer(help="Executable checks of the paper's theory.", no_args_is_help=True)


def _model_and_method(spec: str, method_key: str | None, length: int, seed: int, dtype: torch.dtype) -> tuple:
    """The model (a run folder's, or a Hugging Face model) and the context method to check on it: the run's own
    trained adapter when it is a context method, else a seeded random one of `length` virtual tokens."""
    from ctxtune.methods import make_method
    from ctxtune.train.runs import load_run_method, load_run_model, read_run

    if is_run_folder(spec):
        record = read_run(spec)
        model = load_run_model(spec).to(dtype).eval()
        trained = record.spec.method
        if record.saves == "adapter" and method_key in (None, trained) and trained in context_methods():
            return model, load_run_method(spec, model, adapter=0).to(dtype)
    else:
        from ctxtune.hf.backbone import load_backbone

        model = load_backbone(spec, dtype)
    method = make_method(method_key or "prefix", model, n_virtual=length)
    method.init_adapter(0, torch.Generator().manual_seed(seed))
    return model, method.to(dtype)


def _captures(spec: str, method_key: str | None, length: int, seed: int, dtype: torch.dtype) -> tuple:
    """(method name, prefixed captures, base captures, attention modules) on random content tokens."""
    from ctxtune.theory.capture import capture_for, capture_method

    model, method = _model_and_method(spec, method_key, length, seed, dtype)
    n_ctx = model.cfg.n_ctx - method.positions_added(method.config)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.cfg.d_vocab, (N_INPUTS, max(1, min(N_TOKENS, n_ctx))), generator=gen)
    layers = capture_method(method, tokens)
    base = capture_for(model)(model, tokens, position_ids=layers[0].position_ids)
    return method.key, layers, base, model.attention_modules()


def run_checks(model: str, method: str | None, length: int, seed: int, dtype: str) -> dict[str, Any]:
    """Everything `check attention` reports, as one JSON-ready dict."""
    if method is not None and method not in context_methods():
        raise CtxtuneError(f"--method must be one of {', '.join(context_methods())}, got {method!r}")
    if length < 1:
        raise CtxtuneError(f"--length must be at least 1, got {length}")
    if dtype not in DTYPES:
        raise CtxtuneError(f"--dtype must be float32 or float64, got {dtype!r}")
    with torch.no_grad():
        key, layers, base, modules = _captures(str(Path(model).expanduser()) if model != "smollm2" else model,
                                               method, length, seed, DTYPES[dtype])
        results: list[CheckResult] = check_layers(layers)
        for la, module in zip(layers, modules, strict=True):
            results += check_weights_control(la, perturbed_copy(module, seed))
        cross = cross_layer_changes(layers, base)
    alphas = [s for la in layers for s in alpha_stats(la)]
    return {
        "model": model,
        "method": key,
        "length": layers[0].n_virtual,
        "dtype": dtype,
        "checks": [
            {k: r.to_dict()[k] for k in ("layer", "head", "kind", "max_abs_err", "tol", "passed", "control")}
            for r in results
        ],
        "alpha": [vars(s) for s in alphas],
        "cross_layer": [c.to_dict() for c in cross],
        "passed": all(r.ok for r in results),
    }


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


@check_app.command("attention")
@cli_errors
def attention(
    model: str = typer.Option(..., "--model", help="run folder, HF folder, .gguf file, or 'smollm2'"),
    method: str = typer.Option(
        None, "--method", help="prefix | prefix_kv | soft_prompt (default: the run's, else prefix)"
    ),
    length: int = typer.Option(1, "--length", help="number of virtual tokens P of a random adapter"),
    seed: int = typer.Option(0, "--seed", help="seed of the random adapter, inputs and weight control"),
    dtype: str = typer.Option("float64", "--dtype", help="float32 | float64"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
) -> None:
    """Check that a prefix only rescales content attention and biases each head's output.

    Without a trained adapter a seeded random one is used. The cross-layer column compares with the
    base model's OWN inputs and is information, not a check.

    Example: ctxtune check attention --model smollm2 --method prefix_kv --length 10 --dtype float32
    """
    report = run_checks(model, method, length, seed, dtype)
    if as_json:
        emit_json(report)
    else:
        from rich.console import Console

        console = Console()
        console.print(_table(report))
        console.print(
            "cross-layer dA: max |renormalised attention - base model's own attention| (not a check)"
        )
        console.print(
            "[green]all checks as expected[/]" if report["passed"] else "[red]some checks failed[/]"
        )
    if not report["passed"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `check` command group to the ctxtune app."""
    app.add_typer(check_app, name="check")


__all__ = ["CrossLayerChange", "LayerAttention", "register", "run_checks"]
