"""`ctxtune reproduce --scale quick` timed side by side: serial vs parallel, quiet vs a busy machine.

    python benchmarks/reproduce_load.py [--seeds 3] [--only STUDY ...] [--out benchmarks/reproduce_load.json]
                                        [--keep results/quick-reference]

Runs, one after another on this machine (each into its own temporary folder, so none reuses another's runs):
    serial         --executor local --threads 2 (one job after another, torch on both cores)
    parallel       the default: one worker process per usable core, each run on the threads its size calls for
    parallel_busy  the default again while one other CPU-bound process (a busy loop) runs the whole time
and writes their wall times and the ratios `make bench` reports (parallel / serial, busy / quiet). Takes
the time of three quick reproductions: run it on a quiet machine (the busy run brings its own load).
`--keep DIR` copies the quiet parallel run's folder (report, results.json, runs) to DIR.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--out", type=Path, default=HERE / "reproduce_load.json")
    parser.add_argument("--keep", type=Path, default=None, help="copy the quiet parallel run's folder here")
    args = parser.parse_args(argv)
    record: dict = {"seeds": args.seeds, "only": args.only, "cores": len(os.sched_getaffinity(0)),
                    "load_before": os.getloadavg()[0], "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ctxtune-repro-load-") as tmp:
        root = Path(tmp)
        record["runs"]["parallel"] = reproduce(root / "parallel", args.seeds, args.only, [])
        if args.keep is not None:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(root / "parallel", args.keep)
        record["runs"]["serial"] = reproduce(root / "serial", args.seeds, args.only,
                                             ["--executor", "local", "--threads", "2"])
        stop = multiprocessing.Event()
        competitor = multiprocessing.Process(target=busy_loop, args=(stop,))
        competitor.start()
        try:
            record["runs"]["parallel_busy"] = reproduce(root / "busy", args.seeds, args.only, [])
        finally:
            stop.set()
            competitor.join()
    runs = record["runs"]
    record["parallel_over_serial"] = round(runs["parallel"]["wall_seconds"] / runs["serial"]["wall_seconds"], 3)
    record["busy_over_quiet"] = round(runs["parallel_busy"]["wall_seconds"] / runs["parallel"]["wall_seconds"], 3)
    record["measured"] = time.strftime("%Y-%m-%d %H:%M")
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
