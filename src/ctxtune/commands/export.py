"""`ctxtune export gpt2` and `ctxtune export peft`: a run's model as a Hugging Face GPT-2 folder, its
prefix or soft prompt as a PEFT adapter folder (see `ctxtune.hf.export` for what is exact and why).

Both write their folder atomically (a temporary folder renamed into place) and, when the [hf] extra is
installed, first load what they wrote with transformers / PEFT and compare logits with ctxtune in
float64; a mismatch writes nothing. Exit code 0: written; 1: the check failed; 2: bad input or refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import typer

from ctxtune.commands.common import check_not_in_run_folder, check_out_apart, cli_errors, emit_json, fail
from ctxtune.errors import CtxtuneError

export_app = typer.Typer(
    help="Export a run to Hugging Face formats: the model as GPT-2, a prefix or soft prompt as a PEFT adapter.",
    no_args_is_help=True,
)


def hf_available() -> bool:
    """Whether transformers and peft are installed (the [hf] extra), without importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))


def _check_flag(check: bool, notes: list[str]) -> bool:
    if check and not hf_available():
        notes.append("not checked: the check loads the export with transformers and peft (pip install 'ctxtune[hf]')")
        return False
    return check


def export_model(run: Path, out: Path, overwrite: bool, check: bool) -> dict[str, Any]:
    """`export gpt2`: the run's model (its own weights, else its base run's) as a GPT-2 folder."""
    from ctxtune.hf.export import export_gpt2
    from ctxtune.train.runs import load_run_model, read_run

    record = read_run(run)
    inputs: list[tuple[str, str | Path]] = [("run folder", run)]
    if record.spec.kind == "tune":
        inputs.append(("base of the run", record.base().source))
    check_out_apart(out, "--out", inputs)
    check_not_in_run_folder(out, "--out")
    model = load_run_model(run)
    notes: list[str] = []
    if record.saves != "model":
        notes.append(f"tune run with method {record.spec.method!r}: its base model is exported (the adapter is "
                     "not part of it)")
    result = export_gpt2(model, out, overwrite=overwrite, check=_check_flag(check, notes))
    result.notes = notes + result.notes
    return result.to_dict()


def export_adapter(
    run: Path, out: Path, index: int, base_model: str | None, overwrite: bool, check: bool
) -> dict[str, Any]:
    """`export peft`: adapter `index` of a prefix_kv / prefix / soft_prompt run as a PEFT folder."""
    from ctxtune.hf.export import export_peft
    from ctxtune.train.runs import load_run_method

    check_out_apart(out, "--out", [("run folder", run)])
    check_not_in_run_folder(out, "--out")
    method = load_run_method(run)
    notes: list[str] = []
    result = export_peft(
        method, out, index=index, base_model=base_model, overwrite=overwrite, check=_check_flag(check, notes)
    )
    result.notes = notes + result.notes
    return result.to_dict()


def _print(report: dict[str, Any]) -> None:
    print(f"wrote {report['folder']} ({', '.join(report['files'])})")
    check = report["check"]
    if check is not None:
        print(
            f"checked against {check['against']}: max |logit difference| {check['max_abs_diff']:.2e} "
            f"in {check['dtype']} (tolerance {check['tol']:.0e})"
        )
    for note in report["notes"]:
        print(f"note: {note}")


def _run_export(fn: Any, as_json: bool, **kwargs: Any) -> None:
    """Run an export; a failed logit check is exit code 1 (a bug to report), other errors exit 2."""
    try:
        report = fn(**kwargs)
    except CtxtuneError as exc:
        if str(exc).startswith("export check failed"):
            raise fail(str(exc), 1) from None
        raise
    if as_json:
        emit_json(report)
    else:
        _print(report)


@export_app.command("gpt2")
@cli_errors
def gpt2_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder: a pretrain run, or any tune run (its model is exported)."),
    out: Path = typer.Option(..., "--out", help="Folder to create: config.json + model.safetensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    check: bool = typer.Option(True, "--check/--no-check", help="Load the export with transformers; compare logits."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export a run's GPT as a Hugging Face GPT-2 folder (GPT2LMHeadModel.from_pretrained loads it).

    Refused, with the reason, for what GPT-2 cannot express: rotary positions, RMSNorm, no norms or no
    pre-attention norm, no residual, d_head != d_model / n_heads.

    Example: ctxtune export gpt2 --run runs/pretrain --out exports/gpt2
    """
    _run_export(export_model, as_json, run=run, out=out, overwrite=overwrite, check=check)


@export_app.command("peft")
@cli_errors
def peft_cmd(
    run: Path = typer.Option(..., "--run", help="Tune run folder of a prefix_kv, prefix or soft_prompt method."),
    out: Path = typer.Option(..., "--out", help="Folder to create: adapter_config.json + adapter_model.safetensors."),
    index: int = typer.Option(0, "--index", help="Which adapter of a bank (tune runs with several tasks)."),
    base_model: str = typer.Option(
        None, "--base-model", help="Recorded as base_model_name_or_path (e.g. the folder from `export gpt2`)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Load the adapter with PEFT on the exported base; compare logits."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export a trained prefix or soft prompt as a PEFT adapter folder (PeftModel.from_pretrained loads it).

    PEFT puts the content after the virtual tokens (ctxtune's position_policy "shift"). A "keep" run is
    converted where that is exact (no positions; a rotary prefix, whose keys are rotated by P) and
    refused otherwise (learned positions; a rotary soft prompt).

    Example: ctxtune export peft --run runs/prefix --out exports/prefix --base-model exports/gpt2
    """
    _run_export(
        export_adapter, as_json, run=run, out=out, index=index, base_model=base_model, overwrite=overwrite,
        check=check,
    )


def register(app: typer.Typer) -> None:
    """Add the `export` command group to the ctxtune app."""
    app.add_typer(export_app, name="export")
