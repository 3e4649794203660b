"""Hand-built transformers in which one virtual token controls the output (paper Section 3).

`make_unconditional` (any sequence in [V]^N), `make_conditional` (any map [V] -> [V]^N), capacity
counting in `capacity`, the precision account of the two-user-token demo in `two_token`, and
`universal`: prefixes of one hand-set attention head that approximate continuous functions on the circle.
"""

from ctxtune.constructions.capacity import (
    CapacityResult,
    count_capacity,
    count_hard_completions,
    count_reached,
    find_precision_limit,
    intended_attention,
)
from ctxtune.constructions.conditional import ConditionalConstruction, make_conditional
from ctxtune.constructions.decoding import Construction, greedy_generate
from ctxtune.constructions.unconditional import UnconditionalConstruction, make_unconditional

__all__ = [
    "CapacityResult",
    "ConditionalConstruction",
    "Construction",
    "UnconditionalConstruction",
    "count_capacity",
    "count_hard_completions",
    "count_reached",
    "find_precision_limit",
    "greedy_generate",
    "intended_attention",
    "make_conditional",
    "make_unconditional",
]
