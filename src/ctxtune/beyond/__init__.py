"""Beyond the paper: suffix vs prefix, a "will a prefix be enough?" diagnostic, universal approximation.

Modules:
    suffix: the per-layer decomposition for suffixes vs prefixes, and a small learning comparison.
    diagnose: fit a cheap LoRA, then measure per head whether a prefix could express its change.
    universal: prefixes of a fixed single attention head approximate continuous functions on the circle.
    report: `beyond_section(results_dir)`, the Markdown section the report includes.
"""

from ctxtune.beyond.report import beyond_section

__all__ = ["beyond_section"]
