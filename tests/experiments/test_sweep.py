"""Sweep specs: grid expansion, validation, a tiny sweep with a failing run, and re-runs that skip."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import LocalExecutor
from ctxtune.experiments.jobs import execute
from ctxtune.experiments.store import ResultsStore
from ctxtune.experiments.sweep import expand, run_sweep
from ctxtune.train import RunSpec

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
    """The job worker, except that every LoRA run fails."""
    if job["spec"]["method"] == "lora":
        raise RuntimeError("lora is broken today")
    return execute(job)


def kinds(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["spec"]["kind"] for j in jobs]


def test_expand_grid(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["grid"].update(seeds=[0, 1], options={"prefix": {"n_virtual": [1, 2]}})
    spec["resources"] = {"tune": {"num_cpus": 1, "num_gpus": 0.25}}
    plan = expand(spec, tmp_path)
    jobs = plan["jobs"]
    assert kinds(jobs) == ["pretrain", "tune", "tune", "tune"] * 2
    assert len({j["id"] for j in jobs}) == len(jobs) == 8
    pre = {j["seed"]: j for j in jobs if j["spec"]["kind"] == "pretrain"}
    for j in jobs:
        run_spec = RunSpec.from_dict(j["spec"])
        base = "run:" + pre[j["seed"]]["config_hash"] if run_spec.kind == "tune" else None
        assert j["config_hash"] == run_spec.fingerprint(base)  # the base is named by its configuration
        assert Path(j["out_dir"]) == (tmp_path / "runs" / j["config_hash"][:8]).resolve()
        assert run_spec.train.seed == j["seed"] and j["study"] == "tiny"
        if run_spec.kind == "tune":
            assert j["depends_on"] == [pre[j["seed"]]["id"]] and run_spec.base == pre[j["seed"]]["out_dir"]
            assert j["resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert sorted(
        j["spec"]["options"].get("n_virtual", 0) for j in jobs if j["seed"] == 0 and j["spec"]["kind"] == "tune"
    ) == [0, 1, 2]
    # The hash is the configuration's, not the folder's: another sweep folder gives the same hashes.
    assert [j["config_hash"] for j in expand(spec, tmp_path / "elsewhere")["jobs"]] == [
        j["config_hash"] for j in jobs
    ]
    pre_defaults = jobs[0]["spec"]["train"]
    assert pre_defaults["weight_decay"] == 0.1 and pre_defaults["train_mode"] is True
    rows = plan["study"]["rows"]
    assert rows == ["base", "prefix(n_virtual=1).descending", "prefix(n_virtual=2).descending",
                    "lora.descending"]


def test_tune_an_existing_base(tmp_path: Path, pretrain_run: Any) -> None:
    from ctxtune.model import ModelConfig

    pretrain_run(tmp_path / "base", ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=32))
    spec = copy.deepcopy(SPEC)
    del spec["pretrain"], spec["model"]
    spec["tune"]["base"] = str(tmp_path / "base")
    jobs = expand(spec, tmp_path)["jobs"]
    assert kinds(jobs) == ["tune", "tune"]
    assert all(j["depends_on"] == [] and j["spec"]["base"] == str((tmp_path / "base").resolve()) for j in jobs)
    spec["tune"]["base"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="missing"):  # validated before anything is written
        expand(spec, tmp_path / "never")
    assert not (tmp_path / "never").exists()


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
        (lambda s: s.update(name="../../escaped"), "no path separators"),
        (lambda s: s.update(name="a/b"), "no path separators"),
        (lambda s: s["model"].update(n_ctx=8), "needs 20 positions"),
        (lambda s: s.update(grid=3), "must be a table"),
        (lambda s: s["tune"]["train"].update(lr="fast"), "lr"),
    ],
)
def test_bad_specs_are_config_errors(edit: Any, message: str, tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    edit(spec)
    with pytest.raises(ConfigError, match=message):
        expand(spec, tmp_path)


def test_sweep_records_failures_goes_on_and_skips_finished_runs(tmp_path: Path) -> None:
    plan = expand(SPEC, tmp_path)
    pre, prefix, lora = plan["jobs"]
    res = run_sweep(plan, tmp_path, LocalExecutor(), worker=f"{__name__}:picky_worker")
    doc = res["doc"]
    assert (doc["jobs"]["ok"], doc["jobs"]["failed"], doc["jobs"]["skipped"]) == (2, 1, 0)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"] == doc["runs"] and on_disk["schema"] == "ctxtune.results/2"
    by_id = {r["id"]: r for r in on_disk["runs"]}
    assert by_id[lora["id"]]["status"] == "failed"
    assert by_id[lora["id"]]["error"] == "RuntimeError: lora is broken today"
    assert by_id[prefix["id"]]["status"] == "ok" and by_id[prefix["id"]]["method"] == "prefix"
    cells = {c["cell"]: c for c in on_disk["studies"]["tiny"]["cells"]}
    assert 0.0 <= cells["prefix(n_virtual=1).descending/descending"]["values"][0] <= 1.0
    assert "lora(rank=1).descending/descending" not in cells

    # Again with the same worker: the finished runs are skipped, the failed one is tried (and fails) again.
    started: list[str] = []
    again = run_sweep(plan, tmp_path, LocalExecutor(), worker=f"{__name__}:picky_worker",
                      on_event=lambda e: started.append(e.job["id"]) if e.kind == "start" else None)
    assert started == [lora["id"]] and again["stored"] == 2 and again["doc"]["jobs"]["failed"] == 1

    # Fixed worker: only the failed run executes; its base is found finished.
    res = run_sweep(plan, tmp_path, LocalExecutor())
    assert (res["doc"]["jobs"]["ok"], res["doc"]["jobs"]["failed"], res["stored"]) == (3, 0, 2)
    rows = ResultsStore(tmp_path / "results.sqlite").runs()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}
    assert {r["job_id"]: r["attempts"] for r in rows}[lora["id"]] == 3


def test_execute_is_idempotent(tmp_path: Path) -> None:
    spec = copy.deepcopy(SPEC)
    spec["grid"].update(methods=["prefix"], options={})
    pre, tune = expand(spec, tmp_path)["jobs"]
    first = execute(pre)
    mtime = (Path(pre["out_dir"]) / "model.safetensors").stat().st_mtime_ns
    again = execute(pre)
    assert again["cached"] and {**again, "cached": False} == first  # the stored result; nothing is retrained
    assert (Path(pre["out_dir"]) / "model.safetensors").stat().st_mtime_ns == mtime
    assert first["steps"] == 4 and first["kind"] == "pretrain"
    assert execute(tune)["method"] == "prefix"


def test_shipped_example_sweep_expands() -> None:
    """examples/sweep.toml (the spec docs/scale-out.md shows) is valid and expands to its grid."""
    from pathlib import Path

    from ctxtune.experiments.sweep import expand, load_spec

    spec, name = load_spec(Path(__file__).parents[2] / "examples" / "sweep.toml")
    jobs = expand(spec, "/tmp/unused-sweep-dir", name)["jobs"]
    tunes = [j for j in jobs if j["spec"]["kind"] == "tune"]
    assert len([j for j in jobs if j["spec"]["kind"] == "pretrain"]) == 3  # one base per seed
    assert len(tunes) == 3 * 2 * (2 + 1)  # seeds x tasks x (prefix n_virtual in {1, 4} + one lora)
