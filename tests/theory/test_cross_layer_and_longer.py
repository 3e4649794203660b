"""Cross-layer changes (separate from the identity) and the Appendix B per-head statistics."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from ctxtune.model import GPT, LayerPrefix, ModelConfig
from ctxtune.theory import capture_gpt
from ctxtune.theory.cross_layer import cross_layer_changes
from ctxtune.theory.longer_prefix import effective_rank, plot_prefix_shares, prefix_share_stats

matplotlib.use("Agg")


def _setup(p: int = 3) -> tuple:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layers=3, n_heads=4, d_model=32, n_ctx=32, d_vocab=11)).double().eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (16, 8), generator=gen)
    prefix = [
        LayerPrefix(hidden=3 * torch.randn(1, p, 32, generator=gen, dtype=torch.float64)) for _ in range(3)
    ]
    return model, tokens, capture_gpt(model, tokens, prefix=prefix), capture_gpt(model, tokens)


def test_cross_layer_zero_at_first_layer_large_later() -> None:
    model, tokens, layers, base = _setup()
    changes = cross_layer_changes(layers, base)
    assert len(changes) == 3 * 4
    first = [c.max_abs_change for c in changes if c.layer == 0]
    later = [c.max_abs_change for c in changes if c.layer == 2]
    assert max(first) < 1e-12  # same inputs at layer 0: the identity
    assert max(later) > 1e-3  # changed inputs: the cross-layer effect
    assert all(c.mean_abs_change <= c.max_abs_change for c in changes)


def test_prefix_share_stats_per_head() -> None:
    _, _, layers, _ = _setup(p=4)
    stats = prefix_share_stats(layers[1])
    assert [s.head for s in stats] == [0, 1, 2, 3]  # per head, not one head per layer
    for s in stats:
        assert s.shares.shape == (16, 4)
        assert torch.allclose(s.shares.sum(1), torch.ones(16, dtype=torch.float64))
        assert (s.spread >= 0).all() and 0 <= s.mean_spread <= 1
        assert 1.0 <= s.effective_rank <= 4.0 + 1e-9  # biases live in a span of dimension <= P
    assert len(prefix_share_stats(layers[0], query="all")[0].shares) == 16 * 8
    with pytest.raises(ValueError):
        prefix_share_stats(layers[0], query="first")


def test_effective_rank_values() -> None:
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 5), torch.ones(3))) == pytest.approx(1.0)


def test_plot_returns_figure() -> None:
    from matplotlib.figure import Figure

    _, _, layers, _ = _setup(p=2)
    fig = plot_prefix_shares(prefix_share_stats(layers[0]), title="layer 0")
    assert isinstance(fig, Figure)
    import matplotlib.pyplot as plt

    plt.close(fig)
