"""The layering of docs/architecture.md, kept by a test: what each package may import (module-level and
function-level imports alike), and no method key tested outside `methods/`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ctxtune"

# package -> the ctxtune packages it may import (besides itself). Lower layers never import higher ones.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "claims": set(),
    "limits": {"errors"},
    "configs": {"errors", "limits"},
    "io": {"errors"},
    "model": {"errors", "configs", "limits"},
    "tasks": {"errors", "configs"},
    "methods": {"errors", "configs", "limits", "model"},
    "theory": {"errors", "configs", "model", "methods"},
    "hf": {"errors", "configs", "io", "limits", "model", "methods", "theory"},
    "constructions": {"errors", "configs", "io", "limits", "model", "hf"},
    "train": {"__init__", "errors", "configs", "io", "limits", "model", "tasks", "methods", "hf"},
    "experiments": {"errors", "claims", "configs", "limits", "io", "model", "tasks", "methods", "theory", "train",
                    "report"},
    "report": {"errors", "claims", "io"},
    "commands": None,  # the command line may use everything
    "cli": {"commands"},
    "__init__": set(),
}
KEYS = ("hard_prompt", "in_context", "soft_prompt", "prefix", "prefix_kv", "suffix", "lora", "full")


def package_of(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def ctxtune_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctxtune"):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ctxtune")]
        for name in names:
            parts = name.split(".")
            out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


MODULES = sorted(SRC.rglob("*.py"))


def test_every_package_has_a_rule() -> None:
    assert {package_of(p) for p in MODULES} <= set(ALLOWED), "a new package needs a line in ALLOWED and the docs"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SRC)) for p in MODULES])
def test_imports_follow_the_layers(path: Path) -> None:
    pkg = package_of(path)
    allowed = ALLOWED[pkg]
    if allowed is None:
        return
    bad = sorted(ctxtune_imports(path) - allowed - {pkg})
    assert not bad, f"{path.relative_to(SRC)} ({pkg}) imports {bad}; allowed: {sorted(allowed)}"


@pytest.mark.parametrize("path", [p for p in MODULES if package_of(p) != "methods"],
                         ids=[str(p.relative_to(SRC)) for p in MODULES if package_of(p) != "methods"])
def test_no_method_key_is_tested_outside_methods(path: Path) -> None:
    """Method facts live on the method class: `if method == "lora"` and the like belong in methods/."""
    keys = "|".join(KEYS)
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({keys})["']|["']({keys})["']\s*(==|!=)""")
    hits = [line.strip() for line in path.read_text().splitlines() if pattern.search(line)]
    assert not hits, f"{path.relative_to(SRC)} tests a method key: {hits}"
