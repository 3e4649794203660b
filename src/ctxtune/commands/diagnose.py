"""`ctxtune diagnose`: will a prefix be enough for this task on this base? (see ctxtune.theory.heads).

The base is a ctxtune pretraining run or a Hugging Face causal LM (a folder, a .gguf file, "smollm2"); the task
a ctxtune task by name or your own as a JSONL file of prompt/completion pairs (`--task-file`, tokenised by the
model's tokenizer; `ctxtune.tasks.user`). The LoRA fit is an ordinary run (a RunSpec through
`ctxtune.train.run`, on the q, k, v, o maps the model has); with `--adapter` a LoRA the user trained (PEFT or
a ctxtune run) is diagnosed instead and nothing is fitted. The verdict is the "diagnose" analysis of the fit
(`ctxtune.experiments.analyses.diagnose_method`), the same one the diagnose_validation study applies; it is
"inconclusive" when the fit did not learn the task (below 50% exact match) or cannot move attention.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from ctxtune.commands.common import cli_errors, emit_json
from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_EVAL_EXAMPLES

ATTENTION_ROLES = ("q", "k", "v", "o")
NO_QK_FALLBACK = ("o", "mlp_in", "mlp_out")


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_cmd)


def fit_targets(base: Any) -> list[str]:
    """The LoRA targets of the reference fit on a base (a `BaseRef`): q, k, v, o where the model has them. A
    model without separate query/key maps (Hugging Face GPT-2's fused c_attn) gets o, mlp_in and mlp_out; its
    diagnosis is then inconclusive (the fit cannot move any attention pattern)."""
    if base.kind == "run":
        return list(ATTENTION_ROLES)
    from ctxtune.hf.backbone import GPT2_SITES, LLAMA_SITES

    sites = {"llama": LLAMA_SITES, "gpt2": GPT2_SITES}[base.model_config.family]
    roles = [r for r in ATTENTION_ROLES if r in sites]
    return roles if {"q", "k"} <= set(roles) else list(NO_QK_FALLBACK)


def lora_fit_spec(base: str, task: str, steps: int, rank: int, lr: float, seed: int, eval_examples: int,
                  targets: list[str] | None = None, batch_size: int | None = None):  # noqa: ANN201
    """The RunSpec of the diagnostic's LoRA fit: rank r on `targets` (q, k, v, o) of every block, alpha = r, cosine."""
    from ctxtune.train import RunSpec, StreamSpec, TrainConfig

    batch = {} if batch_size is None else {"batch_size": batch_size}
    train = TrainConfig(steps=steps, lr=lr, warmup=min(20, steps // 10), schedule="cosine", min_lr_ratio=0.1,
                        weight_decay=0.0, seed=seed, eval_examples=eval_examples, **batch)
    options = {"rank": rank, "alpha": float(rank), "targets": list(targets or ATTENTION_ROLES)}
    return RunSpec("tune", "lora", (StreamSpec(task, seed=seed),), train, options=options, base=base)


def resolve_task(task: str | None, task_file: Path | None, base: str) -> Any:
    """The task object: a registered task by name, or a JSONL file tokenised by the base's tokenizer."""
    from ctxtune.tasks import get_task

    if (task is None) == (task_file is None):
        raise ConfigError("give exactly one of --task (a ctxtune task) and --task-file (a JSONL file)")
    if task is not None:
        return get_task(task)
    from ctxtune.commands.adapters import file_task

    return file_task(task_file, base)  # type: ignore[arg-type]


def capped_examples(task: Any, default: int) -> int:
    """`default` examples, or at most a file task's whole test split (more would only repeat examples)."""
    by_split = getattr(task, "by_split", None)
    return default if by_split is None else min(default, len(by_split["test"]))


def fit_and_diagnose(base: str, task: Any, args: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Fit the reference LoRA (a run in `out`, else a temporary folder) and diagnose it."""
    from ctxtune.experiments.analyses import diagnose_run
    from ctxtune.tasks.user import save_task
    from ctxtune.train import run

    ref = _base_ref(base)
    targets = args["targets"] or fit_targets(ref)
    spec = lora_fit_spec(base, task.name, args["steps"], args["rank"], args["lr"], args["seed"],
                         capped_examples(task, args["eval_examples"]), targets, args["batch_size"])
    spec.check_inputs()
    with tempfile.TemporaryDirectory(prefix="ctxtune-diagnose-") as tmp:
        folder = out if out is not None else Path(tmp) / "lora"
        if hasattr(task, "by_split"):
            save_task(task, folder)  # the run folder can be read again in a new process (tasks.user)
        run(spec, folder, resume=out is not None)
        return diagnose_run(folder, args["seed"], capped_examples(task, args["examples"]))


def diagnose_adapter(adapter: str, base: str | None, task: Any | None, args: dict[str, Any]) -> dict[str, Any]:
    """Diagnose a LoRA the user trained (PEFT folder or ctxtune run): its accuracy on the task, then the heads."""
    from ctxtune.commands.adapters import open_adapter
    from ctxtune.experiments.analyses import diagnose_method
    from ctxtune.tasks import get_task
    from ctxtune.train.evaluate import evaluate

    opened = open_adapter(adapter, base)
    if opened.identity != "none":
        raise ConfigError(f"{adapter} is a {opened.key} adapter: the diagnosis reads a weight fit (LoRA); check a "
                          "context adapter with `ctxtune check attention --adapter`")
    task = task if task is not None else get_task(opened.task) if opened.task else None
    if task is None:
        raise ConfigError("a PEFT adapter records no task: pass --task or --task-file")
    method = opened.method
    method.model.eval()
    accuracy = evaluate(method, [task], capped_examples(task, args["eval_examples"]), seed=args["seed"],
                        placeholders=opened.placeholders)[0]
    fit = {"rank": getattr(method.config, "rank", None), "steps": None, "lora_accuracy": accuracy,
           "lora_loss": None, "seconds_fit": 0.0}
    return diagnose_method(opened.load_base(next(method.model.parameters()).dtype), method, task, args["seed"],
                           capped_examples(task, args["examples"]), fit)


def _base_ref(base: str) -> Any:
    from ctxtune.train.runs import resolve_base

    return resolve_base(base)


def _check_numbers(args: dict[str, Any], plot: Path | None) -> None:
    sizes = [args[k] for k in ("examples", "eval_examples", "rank", "steps")] + [args["batch_size"] or 1]
    if min(sizes) < 1 or args["seed"] < 0:
        raise ConfigError("--steps, --rank, --batch-size, --examples and --eval-examples must be positive and --seed "
                          "non-negative")
    for key in ("examples", "eval_examples"):
        if args[key] > MAX_EVAL_EXAMPLES:
            raise ConfigError(f"--{key.replace('_', '-')} must be at most {MAX_EVAL_EXAMPLES:,} (hours of decoding), "
                              f"got {args[key]:,}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got {plot}")


@cli_errors
def diagnose_cmd(
    base: str = typer.Option(None, help="The base: a pretrain run folder, a Hugging Face folder, a .gguf file or "
                             "smollm2 (with --adapter: the base of a PEFT adapter)."),
    task: str = typer.Option(None, help="A ctxtune task to adapt to (e.g. descending, double_hist)."),
    task_file: Path = typer.Option(None, "--task-file", help="Your task: a JSONL file of prompt/completion pairs "
                                   "(Hugging Face bases; docs/bring-your-own-model.md)."),
    adapter: str = typer.Option(None, "--adapter", help="Diagnose this trained LoRA (PEFT folder or ctxtune run) "
                                "instead of fitting one."),
    steps: int = typer.Option(300, help="LoRA training steps."),
    rank: int = typer.Option(4, help="LoRA rank."),
    lr: float = typer.Option(1e-2, help="LoRA learning rate (cosine)."),
    batch_size: int = typer.Option(None, "--batch-size", help="LoRA training examples per step (default: the "
                                   "trainer's)."),
    targets: str = typer.Option(None, help="LoRA targets, comma-separated (default q,k,v,o where the model has them)."),
    seed: int = typer.Option(0, help="Seed of the LoRA fit and the analysis data."),
    examples: int = typer.Option(256, help="Test examples for the per-head analysis (a task file: at most its test "
                                 "split)."),
    eval_examples: int = typer.Option(500, "--eval-examples", help="Test examples for the LoRA's accuracy (a task "
                                      "file: at most its test split)."),
    out: Path = typer.Option(None, help="Keep the LoRA fit in this run folder (default: a temporary one)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path = typer.Option(None, help="Write a heatmap PNG here."),
) -> None:
    """Fit a cheap LoRA, then say per head whether a prefix could express its change.

    The verdict is "inconclusive" when the LoRA did not learn the task (below 50% exact match).

    Example: ctxtune diagnose --base runs/asc --task descending --plot heads.png

    Example: ctxtune diagnose --base models/llama --task-file task.jsonl --steps 200
    """
    from ctxtune.theory.heads import Diagnosis, HeadDiagnosis, heatmap, table

    args = {"steps": steps, "rank": rank, "lr": lr, "seed": seed, "examples": examples, "eval_examples": eval_examples,
            "batch_size": batch_size,
            "targets": [t.strip() for t in targets.split(",") if t.strip()] if targets else None}
    _check_numbers(args, plot)
    start = time.perf_counter()
    if adapter is not None:
        if out is not None:
            raise ConfigError("--out keeps a LoRA fit; with --adapter nothing is fitted")
        given = task is not None or task_file is not None
        task_obj = resolve_task(task, task_file, adapter_base(adapter, base)) if given else None
        result = diagnose_adapter(adapter, base, task_obj, args)
    else:
        if base is None:
            raise ConfigError("--base is required (without --adapter): the model to fit the LoRA on")
        result = fit_and_diagnose(base, resolve_task(task, task_file, base), args, out)
    heads = [HeadDiagnosis(**{k: v for k, v in h.items() if k != "label"}) for h in result["heads"]]
    diag = Diagnosis(**{**result, "heads": heads, "seconds_fit": result["seconds_fit"] or 0.0})
    if plot is not None:
        heatmap(diag, plot)
    if json_out:
        emit_json({**diag.to_dict(), "seconds_total": round(time.perf_counter() - start, 3)})
    else:
        typer.echo(table(diag))


def adapter_base(adapter: str, base: str | None) -> str:
    """The base model whose tokenizer reads a task file for --adapter: --base, or the run's / PEFT config's base."""
    from ctxtune.commands.adapters import peft_base
    from ctxtune.hf.adapters import is_peft_folder
    from ctxtune.tasks.user import register_run_tasks
    from ctxtune.train.runs import read_run

    if is_peft_folder(adapter):
        return peft_base(Path(adapter).expanduser(), base)
    register_run_tasks(adapter)
    return read_run(adapter).base().source
