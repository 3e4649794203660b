"""Reports from what jobs wrote: results.json, report.md, report.html (schema: docs/results-schema.md).

Reads only files (plan.json, job folders); never imports torch, the trainer or the models (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctxtune.report.collect import SCHEMA, collect, environment
from ctxtune.report.render import to_html, to_markdown, write_report


def build_report(results_dir: str | Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """Collect a results folder's jobs into results.json and write report.md and report.html."""
    doc = collect(results_dir, wall_seconds=wall_seconds)
    paths = write_report(doc, results_dir)
    return {"doc": doc, "paths": paths}


__all__ = ["SCHEMA", "build_report", "collect", "environment", "to_html", "to_markdown", "write_report"]
