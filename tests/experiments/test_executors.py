"""Executors: dependencies, failures, retries, bit-identical results under local / process / Ray, and a
worker SIGKILLed mid-run that resumes from its checkpoint with no lost or duplicated result.

The workers below are referenced by dotted path (`f"{__name__}:..."`): the process and Ray executors
import this module in their workers, so its top-level imports stay light (no torch).
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.executors import (
    Event,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    chain_costs,
    check_graph,
    get_executor,
)

HERE = __name__


# ----- workers (run inside the executors' processes) -----------------------------------------------
def flaky_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Raises when job["fail"] is set; SIGKILLs itself when job["die"] is set; otherwise echoes."""
    if job.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if job.get("fail"):
        raise ValueError(f"job {job['id']} was told to fail")
    return {"id": job["id"], "pid": os.getpid()}


def train_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The sweep worker, plus a test-only fault: with job["fault"] = a marker path that does not exist
    yet, the process SIGKILLs itself right after its first checkpoint (once: it writes the marker)."""
    from ctxtune.experiments.jobs import execute
    from ctxtune.train import trainer

    fault = job.get("fault")
    if not fault or Path(fault).exists():
        return execute(job)
    original = trainer.Trainer.save_checkpoint

    def save_then_die(self: Any) -> None:
        original(self)
        Path(fault).write_text(f"killed at step {self.step}")
        os.kill(os.getpid(), signal.SIGKILL)

    trainer.Trainer.save_checkpoint = save_then_die
    try:
        return execute(job)
    finally:
        trainer.Trainer.save_checkpoint = original


TINY_TRAIN = {"steps": 6, "batch_size": 8, "eval_examples": 16, "checkpoint_every": 2, "log_every": 1}
TINY_SPEC = {
    "name": "tiny",
    "model": {"n_layers": 1, "n_heads": 2, "d_model": 16, "n_ctx": 32},
    "pretrain": {"task": "ascending", "train": TINY_TRAIN},
    "tune": {"train": {**TINY_TRAIN, "steps": 4, "lr": 0.01}},
    "grid": {
        "seeds": [0],
        "methods": ["prefix"],
        "tasks": ["descending"],
        "options": {"prefix": {"n_virtual": [2]}},
    },
}


def tiny_plan(out: Path, fault: Path | None = None) -> dict[str, Any]:
    from ctxtune.experiments.sweep import expand

    plan = expand(TINY_SPEC, out)
    jobs = plan["jobs"]
    if fault is not None:
        jobs[0]["fault"] = str(fault)  # the pretraining job dies once after its first checkpoint
    return plan


def run_artifacts(job: dict[str, Any]) -> dict[str, Any]:
    """What must match across executors: summary (less timing), metrics log, every stored tensor."""
    import json

    from ctxtune.io import load_tensors

    out = Path(job["out_dir"])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("seconds", "train_seconds", "out_dir", "resumed"):
        summary.pop(key)
    tensors = {}
    for name in ("model.safetensors", "adapter.safetensors"):
        if (out / name).is_file():
            tensors.update({f"{name}/{k}": v for k, v in load_tensors(out / name).items()})
    return {"summary": summary, "metrics": (out / "metrics.jsonl").read_text(), "tensors": tensors}


def assert_same_runs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    import torch

    assert [j["config_hash"] for j in a] == [j["config_hash"] for j in b]
    for ja, jb in zip(a, b, strict=True):
        ra, rb = run_artifacts(ja), run_artifacts(jb)
        assert ra["summary"] == rb["summary"], ja["id"]
        assert ra["metrics"] == rb["metrics"], ja["id"]
        assert ra["tensors"].keys() == rb["tensors"].keys()
        for key, value in ra["tensors"].items():
            assert torch.equal(value, rb["tensors"][key]), f"{ja['id']} {key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The tiny pretrain + tune, run uninterrupted in this process."""
    from ctxtune.experiments.sweep import run_sweep

    out = tmp_path_factory.mktemp("local")
    plan = tiny_plan(out)
    assert run_sweep(plan, out, LocalExecutor(threads=1))["doc"]["jobs"]["ok"] == 2
    return plan["jobs"]


# ----- scheduling and failure policy (cheap) ---------------------------------------------------------
def test_dependency_failure_cascades_and_others_go_on() -> None:
    jobs = [
        {"id": "a", "fail": True},
        {"id": "b", "depends_on": ["a"]},
        {"id": "c", "depends_on": ["b"]},
        {"id": "d"},
    ]
    events: list[Event] = []
    out = LocalExecutor().run(jobs, worker=f"{HERE}:flaky_worker", on_event=events.append)
    assert out["a"].status == "failed" and out["a"].error.startswith("ValueError: job a was told to fail")
    assert out["a"].attempts == 1  # an exception is not retried
    assert out["b"].error == "dependency a failed" and out["b"].attempts == 0
    assert out["c"].error == "dependency b failed"
    assert out["d"].status == "done" and out["d"].result == {"id": "d", "pid": os.getpid()}
    assert [e.kind for e in events if e.job["id"] == "d"] == ["start", "done"]


def test_the_costliest_chain_of_work_starts_first() -> None:
    """List scheduling by critical path: a cheap base whose dependent is long starts before a mid-sized job,
    and the long dependent before the remaining jobs; with equal costs, list order decides."""
    jobs = [
        {"id": "small", "cost": 1},
        {"id": "mid", "cost": 50},
        {"id": "base", "cost": 10},
        {"id": "long", "cost": 100, "depends_on": ["base"]},
        {"id": "tie1", "cost": 1},
    ]
    assert chain_costs({j["id"]: j for j in jobs}) == {"small": 1, "mid": 50, "base": 110, "long": 100, "tie1": 1}
    events: list[Event] = []
    LocalExecutor().run(jobs, worker=f"{HERE}:flaky_worker", on_event=events.append)
    assert [e.job["id"] for e in events if e.kind == "start"] == ["base", "long", "mid", "small", "tie1"]


def test_chain_costs_fall_back_to_step_counts() -> None:
    jobs = {"a": {"id": "a", "spec": {"train": {"steps": 300}}}, "b": {"id": "b", "depends_on": ["a"]},
            "c": {"id": "c", "cost": float("nan")}, "d": {"id": "d", "spec": {"train": {"steps": 40}}}}
    assert chain_costs(jobs) == {"a": 300.0, "b": 0.0, "c": 0.0, "d": 40.0}


def test_graph_is_validated() -> None:
    with pytest.raises(ConfigError, match="duplicate job id 'a'"):
        check_graph([{"id": "a"}, {"id": "a"}])
    with pytest.raises(ConfigError, match="unknown job 'x'"):
        check_graph([{"id": "a", "depends_on": ["x"]}])
    with pytest.raises(ConfigError, match="cycle"):
        check_graph([{"id": "a", "depends_on": ["b"]}, {"id": "b", "depends_on": ["a"]}])
    assert set(check_graph([{"id": "a", "depends_on": ["x"]}], finished=["x"])) == {"a"}


def test_get_executor() -> None:
    assert isinstance(get_executor("local"), LocalExecutor)
    assert isinstance(get_executor("process", workers=3), ProcessExecutor)
    assert get_executor("process", workers=3).workers == 3
    if importlib.util.find_spec("ray") is not None:
        assert isinstance(get_executor("ray", workers=2), RayExecutor)
    else:  # the default install has no Ray: the error names the extra to install
        with pytest.raises(ConfigError, match=r"pip install 'ctxtune\[ray\]'"):
            get_executor("ray", workers=2)
    with pytest.raises(ConfigError, match="unknown executor 'slurm'; choose one of: local, process, ray"):
        get_executor("slurm")
    with pytest.raises(ConfigError, match="--address"):
        get_executor("process", address="auto")


def test_bad_worker_path_fails_the_job() -> None:
    out = LocalExecutor().run([{"id": "a"}], worker="no_such_module_xyz:fn")
    assert out["a"].status == "failed" and "cannot import worker" in out["a"].error


def test_process_pool_retries_a_killed_worker_a_bounded_number_of_times() -> None:
    jobs = [
        {"id": "dies", "die": True},
        {"id": "fails", "fail": True},
        {"id": "ok"},
        {"id": "after", "depends_on": ["dies"]},
    ]
    events: list[Event] = []
    out = ProcessExecutor(workers=2, max_attempts=2).run(jobs, worker=f"{HERE}:flaky_worker", on_event=events.append)
    assert out["dies"].status == "failed" and out["dies"].attempts == 2
    assert out["dies"].error == "worker process died (signal SIGKILL) (2 attempts)"
    assert [e.kind for e in events if e.job["id"] == "dies"] == ["start", "retry", "start", "failed"]
    assert out["fails"].attempts == 1 and "ValueError" in out["fails"].error
    assert out["ok"].status == "done" and out["ok"].result["pid"] != os.getpid()
    assert out["after"].error == "dependency dies failed"


# ----- same results everywhere; faults ------------------------------------------------------------------
@pytest.mark.slow  # the SIGKILL test below also compares process-pool results with the local run, bit for bit
def test_process_pool_gives_bit_identical_results(reference: list[dict[str, Any]], tmp_path: Path) -> None:
    from ctxtune.experiments.sweep import run_sweep

    plan = tiny_plan(tmp_path)
    doc = run_sweep(plan, tmp_path, ProcessExecutor(workers=2))["doc"]
    assert doc["jobs"]["ok"] == 2 and doc["jobs"]["failed"] == 0
    assert_same_runs(reference, plan["jobs"])


def check_fault_recovery(executor: Any, reference: list[dict[str, Any]], out: Path) -> None:
    from ctxtune.experiments.store import ResultsStore
    from ctxtune.experiments.sweep import run_sweep

    marker = out / "killed.marker"
    plan = tiny_plan(out, fault=marker)
    jobs = plan["jobs"]
    events: list[str] = []
    doc = run_sweep(plan, out, executor, worker=f"{HERE}:train_worker", on_event=lambda e: events.append(e.kind))["doc"]
    assert marker.read_text() == "killed at step 2"  # the worker really died after its first checkpoint
    assert events.count("retry") == 1
    assert doc["jobs"]["ok"] == 2 and doc["jobs"]["failed"] == 0
    rows = ResultsStore(out / "results.sqlite").runs()
    assert sorted(r["config_hash"] for r in rows) == sorted(j["config_hash"] for j in jobs)  # none lost, none twice
    assert {r["job_id"]: r["attempts"] for r in rows} == {jobs[0]["id"]: 2, jobs[1]["id"]: 1}
    assert all(r["status"] == "done" and r["metrics"]["rows"][0]["accuracy"] for r in rows)
    assert_same_runs(reference, jobs)  # resumed from step 2: the same tensors as an uninterrupted run


def test_process_pool_recovers_from_sigkill(reference: list[dict[str, Any]], tmp_path: Path) -> None:
    check_fault_recovery(ProcessExecutor(workers=2), reference, tmp_path)


# ----- Ray (slow: starting Ray takes a while) ---------------------------------------------------------------
@pytest.mark.slow
def test_ray_executor_starts_and_stops_its_own_instance() -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    out = RayExecutor(workers=1).run([{"id": "a"}], worker="ctxtune.experiments.executors:noop_job")
    assert out["a"].result == {"id": "a", "noop": True}
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_bit_identical_results(ray_instance: Any, reference: list[dict[str, Any]], tmp_path: Path) -> None:
    from ctxtune.experiments.sweep import run_sweep

    plan = tiny_plan(tmp_path)
    for job in plan["jobs"]:
        job["resources"] = {"num_cpus": 1}
    assert run_sweep(plan, tmp_path, RayExecutor(workers=2))["doc"]["jobs"]["ok"] == 2
    assert_same_runs(reference, plan["jobs"])


@pytest.mark.slow
def test_ray_recovers_from_sigkill(ray_instance: Any, reference: list[dict[str, Any]], tmp_path: Path) -> None:
    check_fault_recovery(RayExecutor(workers=2), reference, tmp_path)


@pytest.mark.slow
def test_ray_failure_policy(ray_instance: Any) -> None:
    jobs = [{"id": "dies", "die": True}, {"id": "fails", "fail": True}, {"id": "ok", "depends_on": ["fails"]}]
    out = RayExecutor(workers=2, max_attempts=2).run(jobs, worker=f"{HERE}:flaky_worker")
    assert out["dies"].attempts == 2 and out["dies"].error.startswith("ray worker died")
    assert out["fails"].attempts == 1 and "ValueError" in out["fails"].error
    assert out["ok"].error == "dependency fails failed"
