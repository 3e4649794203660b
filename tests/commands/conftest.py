"""Fixtures of the command tests: `cli_process`, one fork server running the real CLI (cli_harness.py)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_harness import CliProcess  # noqa: E402


@pytest.fixture(scope="session")
def cli_process() -> Iterator[CliProcess]:
    """One fork server for the whole session."""
    with tempfile.TemporaryDirectory(prefix="ctxtune-cli-") as tmp:
        server = CliProcess(Path(tmp))
        try:
            yield server
        finally:
            server.close()
