"""Suffix vs prefix: the fixed-bias decomposition holds for prefixes and soft prompts, fails for a suffix."""

from __future__ import annotations

import pytest
import torch

from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.theory.suffix import capture_suffix, decomposition, fixed_bias_unexplained, input_dependence


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layers=3, n_heads=2, d_model=32, n_ctx=32)).double().eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so attention moves the suffix's state
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8.0)
    return m


def tokens() -> torch.Tensor:
    return torch.randint(0, 10, (12, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", ["prefix", "soft_prompt"])
def test_prefix_and_soft_prompt_have_fixed_bias(model: GPT, key: str) -> None:
    method = make_method(key, model, 1, n_virtual=2).double()
    rows = decomposition(method, tokens(), 8)
    assert len(rows) == 3
    for r in rows:
        assert r.attention_err < 1e-12 and r.output_err < 1e-12
        assert r.fixed_bias_unexplained < 1e-20
        assert r.key_dependence < 1e-12 and r.value_dependence < 1e-12


@pytest.mark.parametrize("policy", ["keep", "shift"])
def test_suffix_fails_fixed_bias_from_layer_two(model: GPT, policy: str) -> None:
    method = make_method("suffix", model, 1, n_virtual=2, init="randn", position_policy=policy).double()
    rows = decomposition(method, tokens(), 8)
    first, deeper = rows[0], rows[1:]
    # Relative content attention is unchanged at EVERY layer (any extra keys keep the shared normaliser)...
    assert all(r.attention_err < 1e-12 and r.output_err < 1e-12 for r in rows)
    # ...layer 1's suffix keys/values are input independent, deeper ones are not.
    assert first.fixed_bias_unexplained < 1e-20 and first.value_dependence < 1e-12
    for r in deeper:
        assert r.value_dependence > 1e-3 and r.key_dependence > 1e-3
        assert r.fixed_bias_unexplained > 1e-4


def test_capture_suffix_shapes_and_helpers(model: GPT) -> None:
    method = make_method("suffix", model, 1, n_virtual=3, init="randn").double()
    layers = capture_suffix(method, tokens(), 8)
    la = layers[1]
    assert la.prefix_v.shape == (12, 2, 3, 16) and la.pattern.shape == (12, 2, 16, 19)
    # inputs before the suffix cannot see it (causal mask)
    assert float(la.pattern[:, :, :8, :3].abs().max()) == 0.0
    t = la.recompute()[1]
    assert len(fixed_bias_unexplained(la, t)) == 2
    same = torch.ones(5, 2, 3, 4, dtype=torch.float64)
    assert max(input_dependence(same)) < 1e-15
