"""The results store: an SQLite index of runs, one row per configuration, safe with concurrent writers.

The store indexes what run folders hold; it never replaces them (reports read run folders and
`results.json`). One row per configuration hash, so a re-run sweep finds finished runs and skips them,
and a result is recorded once however often a job is retried.

    runs(config_hash PRIMARY KEY, job_id, study, kind, seed, status, attempts, error, config, metrics,
         artifact_dir, created_at, started_at, finished_at)

status moves queued -> running -> done | failed (a failed or interrupted run may start again; a done run
stays done). Concurrency: WAL journal (readers never block the writer), a busy timeout, one short
connection per call and `BEGIN IMMEDIATE` for every write, so several processes may write at once. WAL
needs a local file system: keep the store on the driver's disk, not on NFS.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctxtune.errors import ConfigError

STATUSES = ("queued", "running", "done", "failed")
# Keys of a job dict that say how or where it runs, not what it computes: left out of the hash.
RUNTIME_KEYS = frozenset(
    {"id", "out_dir", "depends_on", "resources", "fault", "config_hash", "study", "base_dir"}
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    config_hash  TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL,
    study        TEXT,
    kind         TEXT,
    seed         INTEGER,
    status       TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    config       TEXT NOT NULL,
    metrics      TEXT,
    artifact_dir TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
"""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: Any) -> str:
    """sha256 hex of the canonical JSON of `config` (stable across processes and Python versions)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def job_hash(job: dict[str, Any]) -> str:
    """The job's "config_hash", or the hash of everything in it but the runtime keys."""
    given = job.get("config_hash")
    if isinstance(given, str) and given:
        return given
    return config_hash({k: v for k, v in job.items() if k not in RUNTIME_KEYS})


class ResultsStore:
    """An SQLite index of runs at `path` (created with its folder when missing).

    Args:
        path: the database file, e.g. DIR/results.sqlite.
        timeout: seconds a writer waits for the lock before giving up.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable results store: {exc}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from its start (no lock upgrade deadlocks)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _ensure(self, conn: sqlite3.Connection, job: dict[str, Any], status: str) -> str:
        key = job_hash(job)
        config = {k: v for k, v in job.items() if k not in RUNTIME_KEYS}
        conn.execute(
            "INSERT OR IGNORE INTO runs (config_hash, job_id, study, kind, seed, status, config,"
            " artifact_dir, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                str(job.get("id", key[:8])),
                job.get("study"),
                job.get("kind"),
                job.get("seed"),
                status,
                canonical_json(config),
                str(job["out_dir"]) if job.get("out_dir") else None,
                time.time(),
            ),
        )
        return key

    def record_queued(self, job: dict[str, Any]) -> None:
        """Index a job as queued (a finished or known run keeps its row)."""
        with self._write() as conn:
            self._ensure(conn, job, "queued")

    def record_start(self, job: dict[str, Any]) -> bool:
        """Mark an attempt of `job` running and count it; False (and nothing changes) if it is done."""
        with self._write() as conn:
            key = self._ensure(conn, job, "queued")
            cur = conn.execute(
                "UPDATE runs SET status='running', attempts=attempts+1, started_at=?, error=NULL"
                " WHERE config_hash=? AND status!='done'",
                (time.time(), key),
            )
            return cur.rowcount == 1

    def record_done(self, job: dict[str, Any] | str, result: dict[str, Any]) -> bool:
        """Store the result of a finished run; True the first time only (a result is recorded once)."""
        key = job if isinstance(job, str) else job_hash(job)
        with self._write() as conn:
            if not isinstance(job, str):
                self._ensure(conn, job, "running")
            cur = conn.execute(
                "UPDATE runs SET status='done', metrics=?, error=NULL, finished_at=?"
                " WHERE config_hash=? AND status!='done'",
                (json.dumps(result, sort_keys=True, default=str), time.time(), key),
            )
            return cur.rowcount == 1

    def record_failure(self, job: dict[str, Any] | str, error: str) -> bool:
        """Record why a run failed; a done run is left alone (returns False)."""
        key = job if isinstance(job, str) else job_hash(job)
        with self._write() as conn:
            if not isinstance(job, str):
                self._ensure(conn, job, "failed")
            cur = conn.execute(
                "UPDATE runs SET status='failed', error=?, finished_at=?"
                " WHERE config_hash=? AND status!='done'",
                (error, time.time(), key),
            )
            return cur.rowcount == 1

    def is_done(self, config_hash: str) -> bool:
        """Whether the run with this configuration hash finished."""
        with self._connect() as conn:
            row = conn.execute("SELECT status FROM runs WHERE config_hash=?", (config_hash,)).fetchone()
        return row is not None and row["status"] == "done"

    def get(self, config_hash: str) -> dict[str, Any] | None:
        """One run as a dict (config and metrics decoded), or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE config_hash=?", (config_hash,)).fetchone()
        return None if row is None else _decode(row)

    def runs(self, status: str | None = None, study: str | None = None) -> list[dict[str, Any]]:
        """Every run (optionally of one status and/or study), oldest first, as dicts."""
        if status is not None and status not in STATUSES:
            raise ConfigError(f"unknown status {status!r}; choose one of: {', '.join(STATUSES)}")
        query, args = "SELECT * FROM runs WHERE 1=1", []
        if status is not None:
            query, args = query + " AND status=?", [*args, status]
        if study is not None:
            query, args = query + " AND study=?", [*args, study]
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY created_at, rowid", args).fetchall()
        return [_decode(r) for r in rows]


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["config"] = json.loads(out["config"]) if out["config"] else None
    out["metrics"] = json.loads(out["metrics"]) if out["metrics"] else None
    return out
