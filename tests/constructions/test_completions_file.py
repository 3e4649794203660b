"""`completions --out`: a partial-results file is checked before any model loads and never continued
after a line cut by a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxtune.constructions.completions import _prepare_out, _read_done, check_partial_results
from ctxtune.errors import CtxtuneError

HEADER = {"model": "m", "n": 4, "length": 2, "seed": 0, "batch_size": 2}


def test_a_cut_last_line_is_dropped_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    good = json.dumps({"pool": "hard", "batch": 0, "tokens": [[1, 2], [3, 4]]})
    path.write_text(json.dumps({"header": HEADER}) + "\n" + good + "\n" + '{"pool": "hard", "batch": 1, "tok')
    done = _read_done(path, HEADER)
    assert list(done) == [("hard", 0)]
    _prepare_out(path, HEADER, done)
    lines = path.read_text().splitlines()
    assert path.read_text().endswith("\n") and [json.loads(x) for x in lines[1:]] == [json.loads(good)]


@pytest.mark.parametrize("text", ["garbage\n", "[1, 2]\n", '{"pool": "hard"}\n'])
def test_a_file_that_is_not_a_results_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with pytest.raises(CtxtuneError, match="is not a `ctxtune completions` results file"):
        check_partial_results(path)


def test_other_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"header": {**HEADER, "seed": 1}}) + "\n")
    with pytest.raises(CtxtuneError, match="written with other settings"):
        _read_done(path, HEADER)
