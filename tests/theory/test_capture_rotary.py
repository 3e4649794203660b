"""The captured queries and keys are the ones attention used (post-rotary), on rotary models.

softmax(q [prefix_k, k]^T / sqrt(d_head)) with the causal mask must reproduce the captured pattern.
Reading the pre-rotary `hook_q`/`hook_k` instead breaks this as soon as positions are not all 0.
"""

from __future__ import annotations

import pytest
import torch

from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.theory.capture import LayerAttention, capture_method


def _rotary_model() -> GPT:
    torch.manual_seed(5)
    return GPT(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=32, d_vocab=11, pos="rotary")).double().eval()


def _pattern_from_qk(la: LayerAttention) -> torch.Tensor:
    """[batch, n_heads, pos, n_virtual + pos] from the captured q, prefix keys and content keys."""
    keys = torch.cat([la.prefix_k, la.k], dim=2)  # [batch, n_heads, n_virtual + pos, d_head]
    scores = la.q @ keys.transpose(-1, -2) / la.q.shape[-1] ** 0.5  # [batch, n_heads, pos, n_keys]
    pos = la.q.shape[2]
    visible = torch.cat([torch.ones(pos, la.n_virtual, dtype=torch.bool), torch.ones(pos, pos).tril().bool()], 1)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)


@pytest.mark.parametrize("key", ["prefix", "prefix_kv", "soft_prompt"])
@pytest.mark.parametrize("policy", ["keep", "shift"])
def test_captured_q_and_keys_reproduce_the_pattern(key: str, policy: str) -> None:
    method = make_method(key, _rotary_model(), n_virtual=3, position_policy=policy)
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(1))
    layers = capture_method(method, tokens)
    for la in layers:
        assert torch.allclose(_pattern_from_qk(la), la.pattern, atol=1e-12), (key, policy, la.layer)
