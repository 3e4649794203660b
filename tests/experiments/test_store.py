"""The SQLite results store: stable hashes, status transitions, results recorded once, concurrent writers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.store import ResultsStore, config_hash, job_hash


def job(i: int, **extra: object) -> dict:
    return {
        "id": f"j{i}",
        "kind": "tune",
        "seed": i,
        "study": "s",
        "out_dir": f"/runs/{i}",
        "lr": 0.1,
        **extra,
    }


def test_config_hash_is_stable_and_ignores_runtime_keys() -> None:
    assert config_hash({"b": 1, "a": [1, 2]}) == config_hash({"a": [1, 2], "b": 1})
    # The same value always hashes the same, in any process and Python version (no salted hash()).
    assert config_hash({"a": 1}) == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    assert job_hash(job(1)) == job_hash(
        {**job(1), "id": "other", "out_dir": "/x", "depends_on": ["z"], "fault": "f"}
    )
    assert job_hash(job(1)) != job_hash(job(1, lr=0.2))
    assert job_hash({"config_hash": "abc"}) == "abc"


def test_lifecycle_and_result_recorded_once(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "r.sqlite")
    j = job(1)
    key = job_hash(j)
    store.record_queued(j)
    assert [r["status"] for r in store.runs()] == ["queued"] and not store.is_done(key)
    assert store.record_start(j)
    assert store.record_failure(j, "worker process died (signal SIGKILL)")
    row = store.get(key)
    assert row["status"] == "failed" and row["error"] == "worker process died (signal SIGKILL)"
    assert store.record_start(j)  # retried
    assert store.record_done(j, {"accuracy": 0.5})
    assert not store.record_done(j, {"accuracy": 0.9})  # a second result for the same run is refused
    assert not store.record_failure(j, "late failure")  # and a done run stays done
    assert not store.record_start(j)
    row = store.get(key)
    assert row["status"] == "done" and row["attempts"] == 2 and row["metrics"] == {"accuracy": 0.5}
    assert row["error"] is None and row["config"]["lr"] == 0.1 and row["artifact_dir"] == "/runs/1"
    assert row["seed"] == 1 and row["study"] == "s" and row["kind"] == "tune"
    assert store.is_done(key)
    assert len(store.runs()) == 1 and store.runs(status="failed") == [] and len(store.runs(study="s")) == 1
    with pytest.raises(ConfigError, match="unknown status"):
        store.runs(status="finished")


def test_wal_mode_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.sqlite"
    ResultsStore(path).record_done(job(2), {"x": 1})
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert ResultsStore(path).is_done(job_hash(job(2)))


def test_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite, just some text that is long enough" * 20)
    with pytest.raises(ConfigError, match="not a usable results store"):
        ResultsStore(bad)


WRITER = textwrap.dedent(
    """
    import sys
    from ctxtune.experiments.store import ResultsStore
    path, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = ResultsStore(path)
    for i in range(n):
        job = {"id": f"w{w}-{i}", "kind": "tune", "seed": i, "writer": w, "out_dir": f"/runs/{w}/{i}"}
        store.record_start(job)
        store.record_done(job, {"accuracy": i / n, "writer": w})
        shared = {"id": "shared", "kind": "tune", "seed": 0}  # every writer races to finish the same run
        store.record_start(shared)
        store.record_done(shared, {"writer": w})
    """
)


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    ResultsStore(path)
    n_proc, n_each = 4, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), str(n_each)], stderr=subprocess.PIPE
        )
        for w in range(n_proc)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    store = ResultsStore(path)
    rows = store.runs()
    assert len(rows) == n_proc * n_each + 1
    assert all(r["status"] == "done" for r in rows)
    own = [r for r in rows if r["job_id"] != "shared"]
    assert sorted(r["job_id"] for r in own) == sorted(
        f"w{w}-{i}" for w in range(n_proc) for i in range(n_each)
    )
    assert all(r["attempts"] == 1 and r["metrics"]["writer"] == r["config"]["writer"] for r in own)
    shared = next(r for r in rows if r["job_id"] == "shared")
    assert shared["metrics"]["writer"] in range(n_proc)  # recorded once, by whichever writer came first
