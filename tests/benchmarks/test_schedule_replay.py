"""benchmarks/schedule_replay.py: list scheduling replayed on a small plan whose answer is worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "schedule_replay.py"


def _module():
    spec = importlib.util.spec_from_file_location("schedule_replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(tmp_path: Path) -> Path:
    """Plan order lists two short jobs before a base whose adapter waits for it (costs equal the seconds)."""
    times = {"x1": 5.0, "x2": 5.0, "base": 10.0, "adapt": 10.0}
    deps = {"adapt": ["base"]}
    jobs = [{"id": j, "cost": t, "depends_on": deps.get(j, [])} for j, t in times.items()]
    (tmp_path / "plan.json").write_text(json.dumps({"jobs": jobs}))
    (tmp_path / "results.json").write_text(json.dumps({"runs": [{"id": j, "seconds": t} for j, t in times.items()]}))
    return tmp_path


def test_replay_by_hand(tmp_path: Path) -> None:
    m = _module()
    jobs, seconds = m.load(_folder(tmp_path))
    order = {j: i for i, j in enumerate(jobs)}
    rank = m.chain_costs(jobs)
    # plan order: x1, x2 at 0; base at 5; adapt at 15 -> 25. Costliest chain: base, x1 at 0; x2 at 5; adapt at 10 -> 20.
    assert m.replay(jobs, seconds, lambda j: order[j], 2) == 25.0
    assert m.replay(jobs, seconds, lambda j: (-rank[j], order[j]), 2) == 20.0
    assert m.longest_chain(jobs, seconds) == 20.0
    assert m.replay(jobs, seconds, lambda j: order[j], 1) == 30.0  # one worker: the sum


def test_cli_prints_both_policies_and_refuses_a_bad_folder(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, str(SCRIPT), str(_folder(tmp_path))], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "plan order:             25 s" in ok.stdout and "costliest chain first:  20 s" in ok.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "absent")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "plan.json not found" in bad.stderr


def test_cli_refuses_an_unreadable_plan(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "plan.json").write_text("{not json")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "readable plan.json" in bad.stderr
