"""Construction sizes are estimated against memory before anything is built; huge counts print."""

from __future__ import annotations

import math

import pytest
import torch

from ctxtune.constructions.capacity import (
    CapacityResult,
    capped_power,
    check_construction_fits,
    log10_int,
    magnitude,
)
from ctxtune.errors import ConfigError


def test_log10_and_magnitude_of_counts_beyond_floats() -> None:
    assert log10_int(1000) == pytest.approx(3.0)
    assert log10_int(1000**1000) == pytest.approx(3000.0)
    assert log10_int(7 ** (10**5)) == pytest.approx(10**5 * math.log10(7))
    assert magnitude(625) == "625" and magnitude(1000**1000) == "10^3000.0"
    assert capped_power(1000, 10**6, 100) == 100 and capped_power(5, 4, 10**6) == 625


def test_huge_target_counts_are_left_out_of_the_json_but_sized() -> None:
    fields = dict(construction="conditional", form="residual", vocab=50, length=50, dtype="float64", exhaustive=False,
                  total=1, reached=1, hard_token_completions=1)  # fmt: skip
    big = CapacityResult(n_targets=50**2500, **fields).to_dict()
    assert big["n_targets"] is None and big["n_targets_log10"] == pytest.approx(2500 * math.log10(50))
    small = CapacityResult(n_targets=625, **fields).to_dict()
    assert small["n_targets"] == 625


@pytest.mark.parametrize(
    ("construction", "form", "vocab", "length", "samples"),
    [("unconditional", "residual", 1000, 1000, None), ("unconditional", "residual", 1000, 1000, 4),
     ("unconditional", "authors", 100, 3000, 10), ("conditional", "residual", 1000, 1000, 1),
     ("unconditional", "residual", 5, 4, 10**12)],
)  # fmt: skip
def test_sizes_beyond_memory_are_refused_naming_the_flags(
    construction: str, form: str, vocab: int, length: int, samples: int | None
) -> None:
    with pytest.raises(ConfigError, match=rf"construct {construction} --vocab {vocab} --length {length}.* memory"):
        check_construction_fits(construction, form, vocab, length, torch.float64, samples)


@pytest.mark.parametrize(
    ("construction", "form", "vocab", "length", "samples"),
    [("unconditional", "residual", 5, 4, None), ("unconditional", "authors", 94, 512, 64),
     ("conditional", "residual", 6, 3, 5), ("unconditional", "residual", 1024, 128, 64)],
)  # fmt: skip
def test_sizes_the_docs_report_measuring_are_accepted(
    construction: str, form: str, vocab: int, length: int, samples: int | None
) -> None:
    check_construction_fits(construction, form, vocab, length, torch.float64, samples)
