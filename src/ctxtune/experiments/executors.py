"""Executors: run a list of jobs, respecting their dependencies, in-process, in worker processes or on Ray.

A job is a JSON-serialisable dict (the contract with `ctxtune.experiments.jobs`)::

    {"id": "tune-1a2b3c4d",          # unique within one `run` call
     "kind": "train" | "analysis",
     "out_dir": "runs/1a2b3c4d",     # the worker writes the run folder here
     "depends_on": ["pretrain-..."], # ids that must finish first
     "resources": {"num_cpus": 1, "num_gpus": 0.25},   # optional; honoured by Ray
     "cost": 3.1e12,                 # optional estimate; the costliest chain of work starts first
     ...}                            # the configuration, read only by the worker

A worker is a top-level function `fn(job) -> dict`, named by a dotted path "package.module:function" so
that a fresh process or a Ray worker on another machine can import it. It must be idempotent: run into
`job["out_dir"]`, return the stored result when the run already finished, and resume from the last
checkpoint otherwise. That is what makes retrying a killed worker safe.

Failure policy (the same for every executor):
- the worker raises: the job fails with "ExceptionType: message" and is not retried (a deterministic
  error would recur);
- the worker process dies (SIGKILL, out of memory, a lost Ray node): the job is retried, up to
  `max_attempts` starts in all, and resumes from its checkpoint;
- a job whose dependency failed is recorded failed with "dependency X failed" and never started.

Every executor runs each job with `threads` torch threads (default 1), so that the same jobs and seeds
give bit-identical CPU results under all three.

(This file is longer than our usual 400 lines: the shared scheduler and its three back ends are kept
together so that the failure policy above reads in one place.)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ctxtune.errors import ConfigError

DEFAULT_WORKER = "ctxtune.experiments.jobs:execute"
EXECUTORS = ("local", "process", "ray")


@dataclass
class JobOutcome:
    """How one job ended.

    Attributes:
        job_id: the job's "id".
        status: "done" or "failed".
        result: what the worker returned (None when failed).
        error: one line naming the failure (None when done).
        attempts: how many times the job was started (0 when a dependency failed).
        seconds: wall time of the last attempt.
        traceback: the worker's traceback when it raised.
    """

    job_id: str
    status: Literal["done", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """A progress event, sent to `on_event` on the driver.

    kind: "start" (an attempt begins), "retry" (an attempt died and will be repeated), "done", "failed".
    """

    kind: Literal["start", "retry", "done", "failed"]
    job: dict[str, Any]
    attempt: int
    outcome: JobOutcome | None = None
    message: str | None = None


EventCallback = Callable[[Event], None]


# ----- running one job (in whichever process the executor chose) ----------------------------------
def resolve_worker(worker: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Import "package.module:function"; a bad path is a ConfigError naming it."""
    module_name, sep, attr = worker.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"worker must look like 'package.module:function', got {worker!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import worker {worker!r}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"worker {worker!r} is not callable")
    return fn


def call_worker(
    worker: str, job: dict[str, Any], paths: list[str] | None = None, threads: int | None = 1
) -> dict:
    """Run `worker(job)` here; exceptions become {"ok": False, ...} instead of propagating.

    Args:
        worker: dotted path of the worker function.
        job: the job dict.
        paths: import paths of the driver to add (so test or user modules import in a fresh process).
        threads: torch threads for the job (None: leave as is).

    Returns:
        {"ok": True, "result": dict} or {"ok": False, "error": str, "traceback": str}.
    """
    for p in reversed(paths or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    if threads is not None and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when the job imports it
    previous = None
    try:
        fn = resolve_worker(worker)
        if threads is not None and "torch" in sys.modules:
            torch = sys.modules["torch"]
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        result = fn(job)
        if not isinstance(result, dict):
            raise TypeError(f"worker {worker} returned {type(result).__name__}, expected a dict")
        return {"ok": True, "result": result}
    except Exception as exc:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return {"ok": False, "error": message, "traceback": traceback.format_exc()}
    finally:
        if previous is not None:
            sys.modules["torch"].set_num_threads(previous)


def noop_job(job: dict[str, Any]) -> dict[str, Any]:
    """A worker that does nothing (benchmarks of executor overhead and tests)."""
    return {"id": job["id"], "noop": True}


def driver_paths() -> list[str]:
    """The driver's own import paths (not the interpreter's), for workers started elsewhere."""
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    out = []
    for p in sys.path:
        path = os.path.abspath(p or os.getcwd())
        if not path.startswith(prefixes) and path not in out and os.path.isdir(path):
            out.append(path)
    return out


# ----- the dependency-aware scheduler shared by every executor ------------------------------------
@dataclass
class Finished:
    """One attempt that ended: the worker's reply, or `crashed` when its process died."""

    job_id: str
    reply: dict[str, Any] | None
    crashed: str | None = None
    seconds: float = 0.0


def chain_costs(by_id: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per job, its estimated cost (`job["cost"]`, else its step count, else 0) plus the costliest chain of
    jobs that wait for it: starting the largest first keeps the critical path short (list scheduling)."""
    waiting_on: dict[str, list[str]] = {job_id: [] for job_id in by_id}
    for job_id, job in by_id.items():
        for dep in job.get("depends_on", []):
            if dep in waiting_on:
                waiting_on[dep].append(job_id)
    rank: dict[str, float] = {}

    def own(job: dict[str, Any]) -> float:
        cost = job.get("cost")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
            return float(cost)
        steps = job.get("spec", {}).get("train", {}).get("steps") if isinstance(job.get("spec"), dict) else None
        return float(steps) if isinstance(steps, int) and steps > 0 else 0.0

    def visit(job_id: str) -> float:  # the graph is acyclic (check_graph)
        if job_id not in rank:
            rank[job_id] = own(by_id[job_id]) + max((visit(d) for d in waiting_on[job_id]), default=0.0)
        return rank[job_id]

    for job_id in by_id:
        visit(job_id)
    return rank


def check_graph(jobs: list[dict[str, Any]], finished: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Validate ids and dependencies (unique ids, known dependencies, no cycle); returns id -> job."""
    by_id: dict[str, dict[str, Any]] = {}
    for job in jobs:
        job_id = job.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ConfigError(f"every job needs a non-empty string 'id', got {job_id!r}")
        if job_id in by_id:
            raise ConfigError(f"duplicate job id {job_id!r}")
        by_id[job_id] = job
    known = set(by_id) | set(finished)
    for job in jobs:
        for dep in job.get("depends_on", []):
            if dep not in known:
                raise ConfigError(f"job {job['id']!r} depends on unknown job {dep!r}")
    state: dict[str, int] = {}  # 1: on the current path, 2: checked

    def visit(job_id: str) -> None:
        state[job_id] = 1
        for dep in by_id[job_id].get("depends_on", []):
            if dep in by_id and state.get(dep) == 1:
                raise ConfigError(f"dependency cycle through job {dep!r}")
            if dep in by_id and dep not in state:
                visit(dep)
        state[job_id] = 2

    for job_id in by_id:
        if job_id not in state:
            visit(job_id)
    return by_id


class Executor(ABC):
    """Runs jobs with dependencies; subclasses only say how to start an attempt and how to wait.

    Args:
        max_attempts: starts allowed per job when its worker process dies (SIGKILL, lost node).
        threads: torch threads per job (None: leave the process default).
    """

    name = "executor"

    def __init__(self, max_attempts: int = 3, threads: int | None = 1) -> None:
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts, self.threads = max_attempts, threads

    # Subclass hooks --------------------------------------------------------------------------------
    def open(self, worker: str) -> None:  # noqa: B027 - optional hook
        """Prepare (start processes, connect to Ray) before the first job."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything `open` acquired; also called after an error or Ctrl-C."""

    @abstractmethod
    def capacity(self) -> int:
        """How many attempts may run at once."""

    @abstractmethod
    def submit(self, job: dict[str, Any], worker: str) -> None:
        """Start one attempt of `job`."""

    @abstractmethod
    def collect(self) -> list[Finished]:
        """Block until at least one running attempt ends; return those that ended."""

    # The scheduler ---------------------------------------------------------------------------------
    def run(
        self,
        jobs: list[dict[str, Any]],
        worker: str = DEFAULT_WORKER,
        on_event: EventCallback | None = None,
        finished: Iterable[str] = (),
    ) -> dict[str, JobOutcome]:
        """Run every job once its dependencies succeeded.

        Args:
            jobs: job dicts (see the module docstring); when several are ready, the one heading the costliest
                chain of work (`chain_costs`) starts first, ties in list order.
            worker: dotted path "module:function" of the worker.
            on_event: called on the driver for every start, retry, done and failure.
            finished: ids of jobs finished earlier (not in `jobs`) that others may depend on.

        Returns:
            job id -> JobOutcome, for every job.
        """
        by_id = check_graph(jobs, finished)
        emit = on_event or (lambda event: None)
        ok = set(finished)
        outcomes: dict[str, JobOutcome] = {}
        rank = chain_costs(by_id)
        waiting = sorted(by_id, key=lambda job_id: -rank[job_id])  # longest chain first; ties in list order
        running: dict[str, int] = {}  # id -> attempt number
        if not waiting:
            return outcomes
        self.open(worker)
        try:
            while waiting or running:
                waiting = self._start_ready(waiting, running, ok, outcomes, by_id, worker, emit)
                if not running:
                    continue
                for fin in self.collect():
                    self._settle(fin, running, ok, outcomes, by_id, worker, emit)
        finally:
            self.close()
        return {job_id: outcomes[job_id] for job_id in by_id}

    def _start_ready(self, waiting, running, ok, outcomes, by_id, worker, emit) -> list[str]:  # noqa: ANN001
        still = []
        for job_id in waiting:
            job = by_id[job_id]
            deps = job.get("depends_on", [])
            bad = next((d for d in deps if d in outcomes and outcomes[d].status == "failed"), None)
            if bad is not None:
                outcome = JobOutcome(job_id, "failed", error=f"dependency {bad} failed")
                outcomes[job_id] = outcome
                emit(Event("failed", job, 0, outcome, outcome.error))
            elif all(d in ok for d in deps) and len(running) < self.capacity():
                running[job_id] = 1
                emit(Event("start", job, 1))
                self.submit(job, worker)
            else:
                still.append(job_id)
        return still

    def _settle(self, fin: Finished, running, ok, outcomes, by_id, worker, emit) -> None:  # noqa: ANN001
        job, attempt = by_id[fin.job_id], running.pop(fin.job_id)
        if fin.crashed is not None and attempt < self.max_attempts:
            emit(Event("retry", job, attempt, message=fin.crashed))
            running[fin.job_id] = attempt + 1
            emit(Event("start", job, attempt + 1))
            self.submit(job, worker)
            return
        if fin.crashed is not None:
            error = f"{fin.crashed} ({attempt} attempts)"
            outcome = JobOutcome(fin.job_id, "failed", error=error, attempts=attempt, seconds=fin.seconds)
        elif fin.reply and fin.reply.get("ok"):
            outcome = JobOutcome(
                fin.job_id, "done", result=fin.reply["result"], attempts=attempt, seconds=fin.seconds
            )
            ok.add(fin.job_id)
        else:
            reply = fin.reply or {}
            outcome = JobOutcome(
                fin.job_id,
                "failed",
                error=reply.get("error", "unknown error"),
                attempts=attempt,
                seconds=fin.seconds,
                traceback=reply.get("traceback"),
            )
        outcomes[fin.job_id] = outcome
        emit(Event(outcome.status, job, attempt, outcome, outcome.error))


# ----- in-process ----------------------------------------------------------------------------------
class LocalExecutor(Executor):
    """Runs jobs one after another in this process (the default). Nothing to retry: a kill ends the sweep."""

    name = "local"

    def __init__(self, max_attempts: int = 3, threads: int | None = 1) -> None:
        super().__init__(max_attempts, threads)
        self._queue: list[tuple[dict[str, Any], str]] = []

    def capacity(self) -> int:
        return 1

    def submit(self, job: dict[str, Any], worker: str) -> None:
        self._queue.append((job, worker))

    def collect(self) -> list[Finished]:
        job, worker = self._queue.pop(0)
        start = time.perf_counter()
        reply = call_worker(worker, job, threads=self.threads)
        return [Finished(job["id"], reply, seconds=time.perf_counter() - start)]

    def close(self) -> None:
        self._queue.clear()


# ----- a pool of worker processes ------------------------------------------------------------------
@dataclass
class _Attempt:
    process: subprocess.Popen
    reply_path: Path
    log_path: Path
    log: Any
    start: float


class ProcessExecutor(Executor):
    """Runs up to `workers` jobs at once, each attempt in a fresh Python process.

    A fresh process per attempt costs an interpreter start, but isolates jobs (global torch state,
    memory) and makes a killed worker easy to see and retry. The child is `python -m
    ctxtune.experiments.executors JOB.json REPLY.json WORKER THREADS`: it never re-imports the
    caller's main module (unlike multiprocessing's "spawn"), so no `if __name__ == "__main__"` guard is
    needed. Its stdout and stderr go to a log whose last line is quoted when the process dies.
    """

    name = "process"

    def __init__(self, workers: int = 2, max_attempts: int = 3, threads: int | None = 1) -> None:
        super().__init__(max_attempts, threads)
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._live: dict[str, _Attempt] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    def open(self, worker: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ctxtune-jobs-")
        paths = driver_paths()
        self._env = dict(os.environ)
        self._env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.threads is not None:
            self._env["OMP_NUM_THREADS"] = str(self.threads)
        # Idle OpenMP threads sleep instead of spinning: on a busy machine, spinning threads of one run steal the
        # core another run (or another program) needs (benchmarks/NOTES.md, "steady under load").
        self._env.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def capacity(self) -> int:
        return self.workers

    def submit(self, job: dict[str, Any], worker: str) -> None:
        assert self._tmp is not None
        self._count += 1
        stem = Path(self._tmp.name) / f"{self._count:05d}"
        job_path, reply_path, log_path = (stem.with_suffix(s) for s in (".job.json", ".reply.json", ".log"))
        job_path.write_text(json.dumps(job))
        log = open(log_path, "wb")  # noqa: SIM115 - closed in _finish
        cmd = [sys.executable, "-m", "ctxtune.experiments.executors", str(job_path), str(reply_path), worker]
        cmd.append(str(self.threads or 0))
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env
        )
        self._live[job["id"]] = _Attempt(process, reply_path, log_path, log, time.perf_counter())

    def collect(self) -> list[Finished]:
        delay = 0.002
        while True:
            done = [job_id for job_id, att in self._live.items() if att.process.poll() is not None]
            if done:
                return [self._finish(job_id) for job_id in done]
            time.sleep(delay)
            delay = min(0.05, delay * 2)

    def _finish(self, job_id: str) -> Finished:
        att = self._live.pop(job_id)
        att.log.close()
        seconds = time.perf_counter() - att.start
        if att.reply_path.is_file():
            return Finished(job_id, json.loads(att.reply_path.read_text()), seconds=seconds)
        code = att.process.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        lines = att.log_path.read_text(errors="replace").strip().splitlines()
        last = f": {lines[-1].strip()[:200]}" if lines and code >= 0 else ""
        return Finished(job_id, None, crashed=f"worker process died ({how}){last}", seconds=seconds)

    def close(self) -> None:
        for att in self._live.values():
            if att.process.poll() is None:
                att.process.kill()
            att.process.wait()
            att.log.close()
        self._live.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _process_main(argv: list[str]) -> int:
    """Entry point of a worker process: run the job in JOB.json, write the reply to REPLY.json."""
    job_path, reply_path, worker, threads = argv
    job = json.loads(Path(job_path).read_text())
    reply = call_worker(worker, job, threads=int(threads) or None)
    tmp = Path(reply_path + ".tmp")
    tmp.write_text(json.dumps(reply, default=str))
    os.replace(tmp, reply_path)  # the parent sees a whole reply or none
    return 0


# ----- Ray -------------------------------------------------------------------------------------------
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


class RayExecutor(Executor):
    """Runs jobs as Ray tasks: on a local Ray instance (started here when `address` is None) or a cluster.

    Each task asks for `job["resources"]` (num_cpus, fractional num_gpus, memory, custom resources;
    default one CPU). Ray's own task retries are off: a task whose worker died is resubmitted by this
    executor, up to `max_attempts` starts, so every attempt is visible to `on_event` and the store.

    Args:
        address: a running cluster ("auto", "ray://host:10001", "host:6379"); None starts a local instance.
        workers: most tasks in flight at once (None: a local instance's CPU count, unlimited on a cluster).
        max_attempts: starts per job when its worker dies.
        threads: torch threads per job.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        max_attempts: int = 3,
        threads: int | None = 1,
    ) -> None:
        super().__init__(max_attempts, threads)
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.address, self.workers = address, workers
        self._refs: dict[Any, tuple[str, float]] = {}
        self._started_ray = False

    def open(self, worker: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray executor needs Ray: pip install 'ctxtune[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            if self.address is None:
                cpus = self.workers or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        self._remote = ray.remote(max_retries=0)(call_worker)
        self._paths = driver_paths()

    def capacity(self) -> int:
        if self.workers is not None:
            return self.workers
        if self.address is None:
            return os.cpu_count() or 1
        return 1 << 30  # a cluster: Ray queues tasks until resources free up

    def submit(self, job: dict[str, Any], worker: str) -> None:
        options = {k: v for k, v in (job.get("resources") or {}).items() if k in RESOURCE_KEYS}
        options.setdefault("num_cpus", 1)
        ref = self._remote.options(**options).remote(worker, job, self._paths, self.threads)
        self._refs[ref] = (job["id"], time.perf_counter())

    def collect(self) -> list[Finished]:
        ray = self._ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        out = []
        for ref in ready:
            job_id, start = self._refs.pop(ref)
            try:
                out.append(Finished(job_id, ray.get(ref), seconds=time.perf_counter() - start))
            except ray.exceptions.RayError as exc:  # the worker, its node or the object died
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                crashed = f"ray worker died ({type(exc).__name__}: {first})"
                out.append(Finished(job_id, None, crashed=crashed, seconds=time.perf_counter() - start))
        return out

    def close(self) -> None:
        for ref in list(self._refs):
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


def get_executor(
    name: str, workers: int | None = 1, address: str | None = None, max_attempts: int = 3,
    threads: int | None = None,
) -> Executor:
    """The executor called `name` ("local", "process" or "ray"); unknown names are a ConfigError.

    Args:
        name: "local", "process" or "ray".
        workers: runs at once (process: None means 1; ray: None means as many as Ray will place).
        address: Ray cluster address (ray only); None starts a local Ray instance.
        max_attempts: starts per job when its worker process dies.
        threads: torch threads per job (None: the process default in this process, 1 in workers).
    """
    if name == "local":
        if address is not None:
            raise ConfigError("--address applies only to --executor ray")
        return LocalExecutor(max_attempts=max_attempts, threads=threads)
    if name == "process":
        if address is not None:
            raise ConfigError("--address applies only to --executor ray")
        return ProcessExecutor(workers=workers or 1, max_attempts=max_attempts, threads=threads or 1)
    if name == "ray":
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("the ray executor needs Ray: pip install 'ctxtune[ray]'")
        return RayExecutor(address=address, workers=workers, max_attempts=max_attempts, threads=threads or 1)
    raise ConfigError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")


if __name__ == "__main__":
    sys.exit(_process_main(sys.argv[1:]))
