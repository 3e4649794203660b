"""Universal approximation by prefixing one fixed head: errors fall with P for continuous targets only."""

from __future__ import annotations

import math

import pytest
import torch

from ctxtune.constructions.universal import (
    TARGETS,
    approximation_study,
    errors,
    fit_prefix,
    fixed_head,
    head_output,
    kernel_prefix,
)
from ctxtune.errors import ConfigError
from ctxtune.report.sections import universal_plot as plot


@pytest.fixture(scope="module")
def study() -> dict:
    return approximation_study(ps=(4, 8, 16, 32, 64))


def test_model_is_fixed_and_prefix_only_mixes_values() -> None:
    model = fixed_head()
    assert not any(p.requires_grad for p in model.parameters())
    # a single prefix token: the output is its value whatever the input (the input's own weight is ~0)
    prefix = kernel_prefix(lambda th: torch.full_like(th, 0.7), 1)
    out = head_output(model, prefix, torch.linspace(-3, 3, 7, dtype=torch.float64))
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-12)


@pytest.mark.parametrize("name", ["sin3", "poly", "abs"])
def test_error_decreases_with_p_for_continuous_targets(study: dict, name: str) -> None:
    sup = study["errors"][name]["sup"]
    assert all(b < a for a, b in zip(sup[1:], sup[2:], strict=False))  # monotone from P = 8 on
    assert sup[-1] < 0.03 and sup[-1] < sup[1] / 5
    assert study["slopes"][name]["sup"] < -0.9


def test_step_stalls_in_sup_norm_but_not_in_l2(study: dict) -> None:
    sup, l2 = study["errors"]["step"]["sup"], study["errors"]["step"]["l2"]
    assert min(sup) > 0.9  # at least half the jump (2), whatever P
    assert abs(study["slopes"]["step"]["sup"]) < 0.05
    assert l2[-1] < l2[0] / 3 and study["slopes"]["step"]["l2"] < -0.4


def test_fixed_temperature_floors(study: dict) -> None:
    fixed = study["fixed_kappa"]["sup"]
    assert fixed[-1] > 0.2 and abs(fixed[-1] - fixed[-2]) < 0.01
    assert study["errors"]["sin3"]["sup"][-1] < fixed[-1] / 5


def test_fit_mode_does_not_get_worse() -> None:
    model, f = fixed_head(), TARGETS["sin3"]
    before = errors(model, kernel_prefix(f, 8), f)[1]
    after = errors(model, fit_prefix(model, f, 8, steps=10), f)[1]
    assert after <= before + 1e-12


def test_bad_inputs_and_plot(tmp_path, study: dict) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError):
        approximation_study(targets=["nope"])
    with pytest.raises(ConfigError):
        kernel_prefix(TARGETS["abs"], 0)
    plot(study, tmp_path / "ua.png")
    assert (tmp_path / "ua.png").stat().st_size > 1000
    assert math.isfinite(study["errors"]["abs"]["l2"][-1])
