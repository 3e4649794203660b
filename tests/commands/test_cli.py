"""The command-line contract of DESIGN.md: every documented command exists and has an example in --help."""

from __future__ import annotations

from collections.abc import Callable

import pytest

CONTRACT = [
    "pretrain",
    "tune",
    "eval",
    "check",
    "construct",
    "completions",
    "reproduce",
    "report",
    "sweep",
    "bench",
    "diagnose",
]


def test_every_documented_command_is_registered(cli: Callable) -> None:
    res = cli(["--help"])
    assert res.code == 0
    listed = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    missing = [c for c in CONTRACT if c not in listed]
    assert not missing, f"commands missing from `ctxtune --help`: {missing}"


@pytest.mark.parametrize("command", [c for c in CONTRACT if c != "check"] + ["check attention"])
def test_help_has_an_example(cli: Callable, command: str) -> None:
    res = cli([*command.split(), "--help"])
    assert res.code == 0, res.stderr
    assert "Example:" in res.stdout or "Examples:" in res.stdout, command


def test_unknown_command_is_one_line_exit_2(cli: Callable) -> None:
    res = cli(["frobnicate"])
    assert res.code == 2 and res.stderr.count("\n") == 1 and "No such command" in res.stderr
