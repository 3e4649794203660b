"""`ctxtune reproduce --scale quick` timed side by side: serial vs parallel, quiet vs a busy machine.

    python benchmarks/reproduce_load.py [--seeds 3] [--only STUDY ...] [--out benchmarks/reproduce_load.json]
                                        [--keep results/quick-reference]

Runs, one after another on this machine (each into its own temporary folder, so none reuses another's runs):
    serial         --executor local --threads 2 (one job after another, torch on both cores)
    parallel       the default: one worker process per usable core, each run on the threads its size calls for
    parallel_busy  the default again while one other CPU-bound process (a busy loop) runs the whole time
and writes their wall times and the ratios `make bench` reports (parallel / serial, busy / quiet). Takes
the time of three quick reproductions: run it on a quiet machine (the busy run brings its own load).
`--keep DIR` copies the quiet parallel run's folder (report, results.json, runs) to DIR; `--runs` picks the
runs and their order (default parallel,parallel_busy,serial); the JSON is rewritten after each run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def busy_loop(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """One CPU-bound competitor: pure Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x * 31 + i) % 1_000_003


def reproduce(out: Path, seeds: int, only: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ctxtune.cli", "reproduce", "--scale", "quick", "--seeds", str(seeds),
           "--out", str(out), "--quiet", "--json", *extra]
    for name in only:
        cmd += ["--only", name]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return {"wall_seconds": round(wall, 1), "load_after": round(os.getloadavg()[0], 2),
            "exit_code": proc.returncode, "jobs": summary.get("jobs"),
            "claims": summary.get("claims"), "stderr_tail": proc.stderr[-500:]}


def run_parallel(out: Path, args: argparse.Namespace) -> dict:
    return reproduce(out, args.seeds, args.only, [])


def run_serial(out: Path, args: argparse.Namespace) -> dict:
    return reproduce(out, args.seeds, args.only, ["--executor", "local", "--threads", "2"])


def run_parallel_busy(out: Path, args: argparse.Namespace) -> dict:
    stop = multiprocessing.Event()
    competitor = multiprocessing.Process(target=busy_loop, args=(stop,))
    competitor.start()
    try:
        return reproduce(out, args.seeds, args.only, [])
    finally:
        stop.set()
        competitor.join()


def _commit() -> str:
    """The checkout the studies come from (PYTHONPATH may point at another worktree's src)."""
    import ctxtune

    src = Path(ctxtune.__file__).resolve().parent
    proc = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


RUNS = {"parallel": run_parallel, "parallel_busy": run_parallel_busy, "serial": run_serial}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--out", type=Path, default=HERE / "reproduce_load.json")
    parser.add_argument("--keep", type=Path, default=None, help="copy the quiet parallel run's folder here")
    parser.add_argument("--runs", type=lambda v: v.split(","), default=["parallel", "parallel_busy", "serial"],
                        help="which runs, in order (comma-separated: parallel, parallel_busy, serial)")
    args = parser.parse_args(argv)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    record: dict = {"seeds": args.seeds, "only": args.only, "cores": len(os.sched_getaffinity(0)),
                    "load_before": os.getloadavg()[0], "commit": _commit(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ctxtune-repro-load-") as tmp:
        root = Path(tmp)
        for name in args.runs:
            record["runs"][name] = RUNS[name](root / name, args)
            if name == "parallel" and args.keep is not None:
                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(root / name, args.keep)
            args.out.write_text(json.dumps(record, indent=1) + "\n")  # what was measured so far survives a stop
    runs = record["runs"]
    if "parallel" in runs and "serial" in runs:
        record["parallel_over_serial"] = round(runs["parallel"]["wall_seconds"] / runs["serial"]["wall_seconds"], 3)
    if "parallel" in runs and "parallel_busy" in runs:
        record["busy_over_quiet"] = round(runs["parallel_busy"]["wall_seconds"] / runs["parallel"]["wall_seconds"], 3)
    record["measured"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
