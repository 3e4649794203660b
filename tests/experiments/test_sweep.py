"""Sweep specs: grid expansion, validation, a tiny sweep with a failing run, and re-runs that skip."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import LocalExecutor
from ctxtune.experiments.store import ResultsStore, job_hash
from ctxtune.experiments.sweep import SWEEP_WORKER, expand, run_job, run_sweep

TINY_TRAIN = {"steps": 4, "batch_size": 8, "eval_examples": 16, "log_every": 1}
SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"n_layers": 1, "n_heads": 2, "d_model": 16, "n_ctx": 32},
    "pretrain": {"task": "ascending", "train": TINY_TRAIN},
    "tune": {"train": {**TINY_TRAIN, "lr": 0.01}},
    "grid": {
        "seeds": [0],
        "methods": ["prefix", "lora"],
        "tasks": ["descending"],
        "options": {"prefix": {"n_virtual": [1]}, "lora": {"rank": [1]}},
    },
}


def picky_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The sweep worker, except that every LoRA run fails."""
    if job.get("method") == "lora":
        raise RuntimeError("lora is broken today")
    return run_job(job)


def test_expand_grid(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["grid"].update(seeds=[0, 1], options={"prefix": {"n_virtual": [1, 2]}})
    spec["resources"] = {"tune": {"num_cpus": 1, "num_gpus": 0.25}}
    jobs = expand(spec, tmp_path)
    assert [j["kind"] for j in jobs] == ["pretrain", "tune", "tune", "tune"] * 2
    assert len({j["id"] for j in jobs}) == len(jobs) == 8
    pre = {j["seed"]: j for j in jobs if j["kind"] == "pretrain"}
    for j in jobs:
        assert j["config_hash"] == job_hash(
            {
                k: v
                for k, v in j.items()
                if k in ("kind", "seed", "model", "task", "train", "base", "method", "options", "tasks")
            }
        )
        assert Path(j["out_dir"]) == (tmp_path / "runs" / j["config_hash"][:8]).resolve()
        assert j["train"]["seed"] == j["seed"] and j["study"] == "tiny"
        if j["kind"] == "tune":
            assert j["depends_on"] == [pre[j["seed"]]["id"]] and j["base_dir"] == pre[j["seed"]]["out_dir"]
            assert j["resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert sorted(
        j["options"].get("n_virtual", 0) for j in jobs if j["seed"] == 0 and j["kind"] == "tune"
    ) == [0, 1, 2]
    # The hash is the configuration's, not the folder's: another sweep folder gives the same hashes.
    assert [j["config_hash"] for j in expand(spec, tmp_path / "elsewhere")] == [
        j["config_hash"] for j in jobs
    ]
    pre_defaults = jobs[0]["train"]
    assert pre_defaults["weight_decay"] == 0.1 and pre_defaults["train_mode"] is True


def test_tune_an_existing_base(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    del spec["pretrain"]
    spec["tune"]["base"] = str(tmp_path / "base")
    jobs = expand(spec, tmp_path)
    assert [j["kind"] for j in jobs] == ["tune", "tune"]
    assert all(j["depends_on"] == [] and j["base"] == str((tmp_path / "base").resolve()) for j in jobs)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(extra=1), "unknown key.*extra"),
        (lambda s: s["grid"].update(seeds=[]), "grid.seeds must be a non-empty list"),
        (lambda s: s["grid"].update(seeds=[0, 0]), "distinct"),
        (lambda s: s["grid"].update(tasks=["nope"]), "nope"),
        (lambda s: s["grid"].update(methods=["nope"]), "nope"),
        (
            lambda s: s["grid"]["options"]["prefix"].update(n_virtual=2),
            "must be a non-empty list of values to try",
        ),
        (lambda s: s["grid"]["options"]["prefix"].update(bogus=[1]), "bogus"),
        (lambda s: s["grid"]["options"].update(full={}), "grid.options must be a table of tables"),
        (lambda s: s["tune"]["train"].update(seed=3), "seeds come from grid.seeds"),
        (lambda s: s["tune"]["train"].update(steps=0), "steps"),
        (lambda s: s["model"].update(d_modl=3), "d_modl"),
        (lambda s: s.pop("pretrain"), "exactly one of"),
        (lambda s: s["pretrain"].pop("task"), "needs a task"),
    ],
)
def test_bad_specs_are_config_errors(edit: Any, message: str, tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    edit(spec)
    with pytest.raises(ConfigError, match=message):
        expand(spec, tmp_path)


def test_sweep_records_failures_goes_on_and_skips_finished_runs(tmp_path: Path) -> None:
    jobs = expand(SPEC, tmp_path)
    pre, prefix, lora = jobs
    summary = run_sweep(jobs, tmp_path, LocalExecutor(), worker=f"{__name__}:picky_worker")
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    by_id = {r["id"]: r for r in on_disk["runs"]}
    assert by_id[lora["id"]]["status"] == "failed"
    assert by_id[lora["id"]]["error"] == "RuntimeError: lora is broken today"
    assert by_id[prefix["id"]]["status"] == "done" and by_id[prefix["id"]]["method"] == "prefix"
    assert 0.0 <= by_id[prefix["id"]]["accuracy"] <= 1.0
    assert by_id[prefix["id"]]["accuracy_by_task"].keys() == {"descending"}
    assert by_id[pre["id"]]["tasks"] == ["ascending"] and by_id[pre["id"]]["config"]["model"]["d_model"] == 16

    # Again with the same worker: the finished runs are skipped, the failed one is tried (and fails) again.
    started: list[str] = []
    again = run_sweep(
        jobs,
        tmp_path,
        LocalExecutor(),
        worker=f"{__name__}:picky_worker",
        on_event=lambda e, c: started.append(e.job["id"]) if e.kind == "start" else None,
    )
    assert started == [lora["id"]] and (again["skipped"], again["failed"]) == (2, 1)

    # Fixed worker: only the failed run executes; its base is found in the store as finished.
    summary = run_sweep(jobs, tmp_path, LocalExecutor(), worker=SWEEP_WORKER)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (3, 0, 2)
    rows = ResultsStore(tmp_path / "results.sqlite").runs()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}
    assert {r["job_id"]: r["attempts"] for r in rows}[lora["id"]] == 3


def test_run_job_is_idempotent(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["grid"].update(methods=["prefix"], options={})
    pre, tune = expand(spec, tmp_path)
    first = run_job(pre)
    mtime = (Path(pre["out_dir"]) / "model.safetensors").stat().st_mtime_ns
    assert run_job(pre) == first  # the stored result; nothing is retrained
    assert (Path(pre["out_dir"]) / "model.safetensors").stat().st_mtime_ns == mtime
    assert first["summary"]["steps"] == 4 and first["kind"] == "pretrain"
    assert run_job(tune)["summary"]["method"] == "prefix"


def test_shipped_example_sweep_expands() -> None:
    """examples/sweep.toml (the spec docs/scale-out.md shows) is valid and expands to its grid."""
    from pathlib import Path

    from ctxtune.experiments.sweep import expand, load_spec

    spec, name = load_spec(Path(__file__).parents[2] / "examples" / "sweep.toml")
    jobs = expand(spec, "/tmp/unused-sweep-dir", name)
    tunes = [j for j in jobs if j["kind"] == "tune"]
    assert len([j for j in jobs if j["kind"] == "pretrain"]) == 3  # one base per seed
    assert len(tunes) == 3 * 2 * (2 + 1)  # seeds x tasks x (prefix n_virtual in {1, 4} + one lora)
