"""`ctxtune pretrain / tune / eval`: the workflow, and bad input (one stderr line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ctxtune.model import ModelConfig

SMALL = ["--layers", "1", "--heads", "1", "--d-model", "16", "--n-ctx", "24"]
FAST = ["--steps", "3", "--batch-size", "8", "--eval-examples", "16", "--quiet"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, pretrain_run: Callable) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = ModelConfig(n_layers=1, n_heads=1, d_model=16, n_ctx=44)
    pretrain_run(out, cfg)
    return out


@pytest.mark.parametrize(
    "method", ["prefix", "prefix_kv", "soft_prompt", "suffix", "lora", "full", "hard_prompt", "in_context"]
)
def test_tune_then_eval_every_method(cli: Callable, base_run: Path, tmp_path: Path, method: str) -> None:
    extra = {"hard_prompt": ["--tokens", "1,2"], "in_context": ["--examples", "1"]}.get(method, [])
    out = tmp_path / method
    res = cli(
        [
            "tune",
            "--base",
            str(base_run),
            "--method",
            method,
            "--task",
            "descending",
            "--out",
            str(out),
            "--json",
            *FAST,
            *extra,
        ]
    )
    assert res.code == 0, res.stderr
    payload = json.loads(res.stdout)
    assert payload["method"] == method and 0.0 <= payload["accuracy"]["descending"] <= 1.0
    assert (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()
    res = cli(["eval", "--run", str(out), "--task", "descending", "--examples", "16", "--json"])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"]["descending"] == pytest.approx(payload["accuracy"]["descending"])


def test_bank_from_repeated_tasks(cli: Callable, base_run: Path, tmp_path: Path) -> None:
    res = cli(
        [
            "tune",
            "--base",
            str(base_run),
            "--method",
            "prefix",
            "--task",
            "ascending",
            "--task",
            "add1",
            "--out",
            str(tmp_path / "bank"),
            "--json",
            *FAST,
        ]
    )
    assert res.code == 0, res.stderr
    assert set(json.loads(res.stdout)["accuracy"]) == {"ascending", "add1"}
    res = cli(["eval", "--run", str(tmp_path / "bank"), "--task", "add1", "--index", "1", "--examples", "16"])
    assert res.code == 0


def test_options_from_toml(cli: Callable, tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        'task = "add1"\n[model]\nn_layers = 1\nn_heads = 2\nd_model = 16\nn_ctx = 24\n'
        "[train]\nsteps = 2\nbatch_size = 4\neval_examples = 8\n"
    )
    res = cli(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet", "--json"])
    assert res.code == 0, res.stderr
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    spec = stored["spec"]
    assert stored["model"]["n_heads"] == 2 and spec["train"]["steps"] == 2 and spec["streams"][0]["task"] == "add1"


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only file system (tmpfs mounted ro); /proc as a fallback."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True
        ).returncode
        == 0
    )
    yield target / "out" if mounted else Path("/proc/ctxtune-readonly/out")
    if mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


def write_bad_run(folder: Path, base_run: Path, kind: str) -> Path:
    """A copy of the base run with its weights broken in one way."""
    shutil.copytree(base_run, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted":
        weights.write_bytes(b"\x00\x01garbage" * 100)
    elif kind == "pickle":
        weights.write_bytes(pickle.dumps({"embed.weight": torch.zeros(10, 16)}))
    elif kind == "shape":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model"]["d_model"] = 32
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "no_config":
        (folder / "config.json").unlink()
    elif kind == "bad_json":
        (folder / "config.json").write_text("{not json")
    return folder


BAD = [  # (name, args builder, expected words in the message)
    (
        "malformed toml",
        lambda b, t: ["pretrain", "--config", str(t / "bad.toml"), "--out", str(t / "o")],
        "malformed TOML",
    ),
    (
        "unknown top key",
        lambda b, t: ["pretrain", "--config", str(t / "top.toml"), "--out", str(t / "o")],
        "unknown key",
    ),
    (
        "unknown model key",
        lambda b, t: ["pretrain", "--config", str(t / "model.toml"), "--out", str(t / "o")],
        "unknown model key",
    ),
    (
        "unknown train key",
        lambda b, t: ["pretrain", "--config", str(t / "train.toml"), "--out", str(t / "o")],
        "unknown train key",
    ),
    (
        "wrong type in toml",
        lambda b, t: ["pretrain", "--config", str(t / "types.toml"), "--out", str(t / "o")],
        "model.n_layers must be int",
    ),
    (
        "wrong train type in toml",
        lambda b, t: ["pretrain", "--config", str(t / "types2.toml"), "--out", str(t / "o")],
        "train.lr must be float",
    ),
    (
        "table not a table",
        lambda b, t: ["pretrain", "--config", str(t / "table.toml"), "--out", str(t / "o")],
        "must be a table",
    ),
    (
        "missing config file",
        lambda b, t: ["pretrain", "--config", str(t / "nope.toml"), "--out", str(t / "o")],
        "not found",
    ),
    (
        "unknown task pretrain",
        lambda b, t: ["pretrain", "--task", "sorting", *SMALL, "--out", str(t / "o")],
        "unknown task",
    ),
    ("no task", lambda b, t: ["pretrain", *SMALL, "--out", str(t / "o")], "no task"),
    (
        "unknown method",
        lambda b, t: ["tune", "--base", str(b), "--method", "prefx", "--task", "add1", "--out", str(t / "o")],
        "unknown method",
    ),
    (
        "unknown task tune",
        lambda b, t: ["tune", "--base", str(b), "--method", "prefix", "--task", "add3", "--out", str(t / "o")],
        "unknown task",
    ),
    (
        "prefix length 0",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "prefix",
            "--n-virtual",
            "0",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "n_virtual",
    ),
    (
        "prefix length negative",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "prefix",
            "--n-virtual",
            "-3",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "n_virtual",
    ),
    (
        "lora rank above width",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "lora",
            "--rank",
            "64",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "exceeds the width",
    ),
    (
        "unknown lora target",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "lora",
            "--targets",
            "q,zz",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "unknown LoRA target",
    ),
    (
        "token ids outside vocab",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "hard_prompt",
            "--tokens",
            "1,42",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "token ids",
    ),
    (
        "tokens not integers",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "hard_prompt",
            "--tokens",
            "a,b",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "comma-separated integers",
    ),
    (
        "sequence longer than n_ctx",
        lambda b, t: [
            "pretrain",
            "--task",
            "add1",
            "--layers",
            "1",
            "--heads",
            "1",
            "--d-model",
            "16",
            "--n-ctx",
            "12",
            "--out",
            str(t / "o"),
        ],
        "n_ctx",
    ),
    (
        "shifted prefix too long",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "prefix",
            "--n-virtual",
            "25",
            "--position-policy",
            "shift",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "n_ctx",
    ),
    (
        "bad position policy",
        lambda b, t: [
            "tune",
            "--base",
            str(b),
            "--method",
            "prefix",
            "--position-policy",
            "left",
            "--task",
            "add1",
            "--out",
            str(t / "o"),
        ],
        "position_policy",
    ),
    (
        "truncated checkpoint",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "truncated")), "--task", "add1"],
        "safetensors",
    ),
    (
        "corrupted checkpoint",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "corrupted")), "--task", "add1"],
        "safetensors",
    ),
    (
        "pickle as checkpoint",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "pickle")), "--task", "add1"],
        "pickle",
    ),
    (
        "checkpoint of another shape",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "shape")), "--task", "add1"],
        "shape",
    ),
    (
        "run without config",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "no_config")), "--task", "add1"],
        "not found",
    ),
    (
        "run config not json",
        lambda b, t: ["eval", "--run", str(write_bad_run(t / "r", b, "bad_json")), "--task", "add1"],
        "invalid JSON",
    ),
    (
        "missing base path",
        lambda b, t: ["tune", "--base", str(t / "nope"), "--method", "prefix", "--task", "add1", "--out", str(t / "o")],
        "not found",
    ),
    ("missing eval run", lambda b, t: ["eval", "--run", str(t / "nope"), "--task", "add1"], "not found"),
    (
        "out not empty",
        lambda b, t: ["tune", "--base", str(b), "--method", "prefix", "--task", "add1", "--out", str(b)],
        "not empty",
    ),
    (
        "out is a file",
        lambda b, t: ["pretrain", "--task", "add1", *SMALL, "--out", str(t / "bad.toml")],
        "not a folder",
    ),
    (
        "negative steps",
        lambda b, t: ["pretrain", "--task", "add1", *SMALL, "--steps", "-5", "--out", str(t / "o")],
        "train.steps",
    ),
    (
        "bad schedule",
        lambda b, t: ["pretrain", "--task", "add1", *SMALL, "--schedule", "linear", "--out", str(t / "o")],
        "schedule",
    ),
    (
        "bad positional scheme",
        lambda b, t: ["pretrain", "--task", "add1", "--pos", "alibi", "--out", str(t / "o")],
        "model.pos",
    ),
    (
        "heads do not divide width",
        lambda b, t: ["pretrain", "--task", "add1", "--d-model", "30", "--heads", "4", "--out", str(t / "o")],
        "divisible",
    ),
    ("eval examples zero", lambda b, t: ["eval", "--run", str(b), "--task", "add1", "--examples", "0"], "--examples"),
    ("adapter out of range", lambda b, t: ["eval", "--run", str(b), "--task", "add1", "--index", "3"], "--index"),
    ("adapter index", lambda b, t: ["eval", "--run", str(b), "--task", "add1", "--adapter", "3"], "--index 3"),
    ("missing required option", lambda b, t: ["tune", "--method", "prefix"], "Missing option"),
    ("unknown flag", lambda b, t: ["pretrain", "--colour", "red"], "No such option"),
    ("wrong type", lambda b, t: ["pretrain", "--steps", "many", "--out", str(t / "o")], "steps"),
]


@pytest.mark.parametrize(("name", "args", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_and_exit_2(
    cli: Callable, base_run: Path, tmp_path: Path, name: str, args: Callable, words: str
) -> None:
    (tmp_path / "bad.toml").write_text("[model\nn_layers = ")
    (tmp_path / "top.toml").write_text('task = "add1"\ncolour = 3\n')
    (tmp_path / "model.toml").write_text('task = "add1"\n[model]\nn_layayers = 2\n')
    (tmp_path / "train.toml").write_text('task = "add1"\n[train]\nbatchsize = 2\n')
    (tmp_path / "table.toml").write_text('task = "add1"\ntrain = 3\n')
    (tmp_path / "types.toml").write_text('task = "add1"\n[model]\nn_layers = "two"\n')
    (tmp_path / "types2.toml").write_text('task = "add1"\n[train]\nlr = "fast"\n')
    before = sorted(p.name for p in base_run.iterdir())
    res = cli(args(base_run, tmp_path))
    assert res.code == 2, (res.code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert words.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "o").exists(), "nothing may be written on bad input"
    assert sorted(p.name for p in base_run.iterdir()) == before


def test_read_only_output_folder(cli: Callable, base_run: Path, readonly_dir: Path) -> None:
    res = cli(
        ["tune", "--base", str(base_run), "--method", "prefix", "--task", "add1", "--out", str(readonly_dir), *FAST]
    )
    assert res.code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "cannot create run folder" in res.stderr and not readonly_dir.exists()


def test_console_script_exit_code_and_single_line(base_run: Path) -> None:
    """The installed entry point itself (a real process), not just the in-process runner."""
    exe = Path(sys.executable).with_name("ctxtune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ctxtune.cli"]
    proc = subprocess.run(
        [*cmd, "tune", "--base", str(base_run), "--method", "nope", "--task", "add1", "--out", "/tmp/x"],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown method" in proc.stderr


def test_help_has_an_example(cli: Callable) -> None:
    for command in ("pretrain", "tune", "eval"):
        res = cli([command, "--help"])
        assert res.code == 0 and "Example: ctxtune " + command in " ".join(res.stdout.split())
