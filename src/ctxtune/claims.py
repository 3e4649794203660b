"""Claim checks: the comparison operators a study spec may use, shared by the spec and the report.

Torch-free on purpose: the report imports it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def holds(observed: float, op: str, value: float) -> bool:
    """Whether `observed op value` (op one of OPS)."""
    return bool(OPS[op](observed, value))
