"""`ctxtune reproduce` and `ctxtune report` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.report.test_report import make_fixture


def test_reproduce_bad_only_exits_2_without_output(cli, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = cli(["reproduce", "--only", "no_such_study", "--out", str(out)])
    assert res.code == 2
    assert res.stderr.startswith("error: unknown study 'no_such_study'") and res.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--scale", "huge"], "unknown scale"), (["--seeds", "0"], "--seeds"),
    (["--executor", "slurm"], "unknown executor"), (["--device", "tpu"], "--device"),
])
def test_reproduce_bad_flags_exit_2(cli, tmp_path: Path, args: list[str], needle: str) -> None:
    res = cli(["reproduce", *args, "--out", str(tmp_path / "r")])
    assert res.code == 2 and needle in res.stderr


def test_reproduce_one_study_json(cli, tmp_path: Path) -> None:
    res = cli(["reproduce", "--only", "cannot_learn_new_attention", "--seeds", "1", "--steps", "2",
               "--eval-examples", "8", "--threads", "1", "--out", str(tmp_path), "--json"])
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["jobs"]["ok"] == doc["jobs"]["total"] == 5
    assert "cannot_learn_new_attention/prefix_fails_full_succeeds" in doc["claims"]
    assert (tmp_path / "report.html").is_file()


def test_report_command(cli, tmp_path: Path) -> None:
    make_fixture(tmp_path)
    res = cli(["report", str(tmp_path), "--json"])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["claims"] == {"toy/c": None}
    missing = cli(["report", str(tmp_path / "nothing")])
    assert missing.code == 2 and "results folder not found" in missing.stderr


def test_help_has_an_example(cli) -> None:
    res = cli(["reproduce", "--help"])
    assert res.code == 0 and "ctxtune reproduce --scale quick" in res.stdout


def _summary(claims: dict) -> dict:
    return {"paths": {"html": "r/report.html"}, "jobs": {"ok": 1, "failed": 0, "skipped": 0}, "wall_seconds": 1.0,
            "failed": {}, "claims": claims}


def test_summary_points_to_the_evidence_only_when_a_claim_fails(capsys) -> None:
    from ctxtune.commands.reproduce import print_summary

    print_summary(_summary({"s/a": True, "s/b": None}))
    assert "why a claim does not hold" not in capsys.readouterr().out
    print_summary(_summary({"s/a": True, "s/b": False}))
    out = capsys.readouterr().out
    assert "s/b: does NOT hold" in out and "why a claim does not hold" in out
