"""`ctxtune sweep`: a tiny sweep end to end, its JSON output, re-runs that skip, and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPEC = """
name = "cli-tiny"

[model]
n_layers = 1
n_heads = 2
d_model = 16
n_ctx = 32

[pretrain]
task = "ascending"
[pretrain.train]
steps = 3
batch_size = 8
eval_examples = 16

[tune.train]
steps = 3
batch_size = 8
eval_examples = 16
lr = 0.01

[grid]
seeds = [0]
methods = ["prefix"]
tasks = ["descending"]
[grid.options.prefix]
n_virtual = [1]
"""


def write_spec(tmp_path: Path, text: str = SPEC, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sweep_runs_and_skips_on_rerun(cli: Callable[[list[str]], Any], tmp_path: Path) -> None:
    spec, out = write_spec(tmp_path), tmp_path / "sweep"
    res = cli(["sweep", str(spec), "--out", str(out), "--json", "--quiet"])
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["jobs"] == {"total": 2, "ok": 2, "failed": 0, "skipped": 0, "missing": 0} and data["stored"] == 0
    assert [r["method"] for r in data["runs"]] == ["full (pretraining)", "prefix"]
    assert all(Path(r["out_dir"]).parent == Path("runs") for r in data["runs"])
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.sqlite").is_file() and results["schema"] == "ctxtune.results/2"
    assert results["runs"] == data["runs"] and (out / "report.html").is_file()
    cells = {c["cell"]: c for c in results["studies"]["cli-tiny"]["cells"]}
    assert set(cells) == {"base/ascending", "prefix(n_virtual=1).descending/descending"}
    assert cells["base/ascending"]["seeds"] == [0]

    res = cli(["sweep", str(spec), "--out", str(out)])
    assert res.code == 0, res.stderr
    assert "2 ok (2 finished before), 0 failed" in res.stdout


def test_sweep_errors_are_one_line(cli: Callable[[list[str]], Any], tmp_path: Path) -> None:
    spec, out = write_spec(tmp_path), str(tmp_path / "o")
    cases = [
        ([str(spec), "--executor", "slurm"], "unknown executor 'slurm'"),
        ([str(spec), "--executor", "local", "--address", "auto"], "--address applies only to --executor ray"),
        ([str(tmp_path / "missing.toml")], "sweep spec not found"),
        ([str(write_spec(tmp_path, "name = [", "bad.toml"))], "malformed TOML"),
        ([str(write_spec(tmp_path, SPEC.replace("seeds = [0]", "seeds = 0"), "seeds.toml"))], "grid.seeds"),
        ([str(spec), "--workers", "0"], "--workers must be >= 1"),
    ]
    for args, message in cases:
        res = cli(["sweep", *args, "--out", out])
        assert res.code == 2, (args, res.stderr)
        assert res.stderr.startswith("error: ") and message in res.stderr and res.stderr.count("\n") == 1
        assert res.stdout == ""
    assert not (tmp_path / "o").exists()


def test_sweep_help_has_an_example(cli: Callable[[list[str]], Any]) -> None:
    res = cli(["sweep", "--help"])
    assert res.code == 0 and "Example: ctxtune sweep" in res.stdout and "--executor" in res.stdout
    text = " ".join(res.stdout.replace("│", " ").split())
    assert "[model], [pretrain], [tune], [grid] and [resources]" in text, text  # rich must not eat [table] names
