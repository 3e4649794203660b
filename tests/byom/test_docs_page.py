"""docs/bring-your-own-model.md: every command of the page runs, in order, on tiny models (a random Llama saved
with save_pretrained, PEFT adapters trained with PEFT, a JSONL task), from a folder laid out as the page says."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import constant_task  # noqa: E402

pytestmark = pytest.mark.hf
PAGE = Path(__file__).resolve().parents[2] / "docs" / "bring-your-own-model.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_commands() -> None:
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("ctxtune ")]
    assert len(commands) >= 10 and any("--adapter adapters/lora" in c for c in commands)


def test_every_command_of_the_page_runs(cli: Callable, llama_dir: Path, peft_adapters: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(llama_dir, tmp_path / "models" / "llama")
    for name in ("prefix", "lora"):
        shutil.copytree(peft_adapters[name], tmp_path / "adapters" / name)
    constant_task(tmp_path / "task.jsonl")
    monkeypatch.chdir(tmp_path)
    for block in blocks("bash"):
        for line in block.splitlines():
            if line.startswith("ctxtune "):
                res = cli(shlex.split(line)[1:])
                assert res.code == 0, (line, res.stderr)
    assert (tmp_path / "runs" / "diagnose" / "config.json").is_file()
    assert (tmp_path / "exports" / "prefix" / "adapter_config.json").is_file()
    for block in blocks("python"):
        exec(compile(block, str(PAGE), "exec"), {})  # noqa: S102 - the page's own snippet


def test_the_documented_error_is_the_real_one(tmp_path: Path) -> None:
    from ctxtune.errors import ConfigError
    from ctxtune.tasks.user import read_task_file

    good, other = '{"prompt": "a:", "completion": " b"}', '{"prompt": "d:", "completion": " e"}'
    lines = [good, good, '{"prompt": "c:"}', other, other, other]
    lines.append('{"prompt": "x" "completion": "y"}')
    (tmp_path / "task.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        read_task_file(tmp_path / "task.jsonl")
    shown = re.search(r"`(error: task file task\.jsonl: .*?)`\.", PAGE.read_text(), flags=re.S).group(1)
    assert " ".join(shown.split()) == "error: " + str(err.value).replace(str(tmp_path) + "/", "")
