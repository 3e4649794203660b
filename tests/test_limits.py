"""ctxtune.limits: memory estimates refuse what cannot fit and accept what does."""

from __future__ import annotations

import pytest

from ctxtune.errors import ConfigError
from ctxtune.limits import check_attention_fits, check_int64, check_memory, training_bytes
from ctxtune.model import ModelConfig

SMOLLM2 = {"n_layers": 30, "d_model": 576, "n_heads": 9, "d_head": 64}  # SmolLM2-135M's attention shape


def test_check_attention_refuses_a_billion_virtual_tokens_and_accepts_ten() -> None:
    with pytest.raises(ConfigError, match=r"check attention --length 1000000000 needs at least about .* GiB"):
        check_attention_fits(**SMOLLM2, length=10**9, element_size=4)
    check_attention_fits(**SMOLLM2, length=10, element_size=4)


def test_check_memory_names_estimate_and_limit() -> None:
    with pytest.raises(ConfigError, match=r"^x needs at least about 2 GiB \(why\), more than this machine's 1 GiB"):
        check_memory(2 * 2**30, "x", "why", limit=2**30)
    check_memory(2**30, "x", limit=2**30)


def test_int64_bounds_are_inclusive() -> None:
    check_int64(2**63 - 1, "n")
    check_int64(-(2**63), "n")
    with pytest.raises(ConfigError, match=r"n = 9223372036854775808 does not fit in a 64-bit integer"):
        check_int64(2**63, "n")


def test_training_estimate_grows_with_every_size_and_counts_prefix_keys() -> None:
    cfg = ModelConfig()
    sizes = {"n_trainable": 1000, "trains_model": False, "rows": 64, "positions": 20, "prefix_keys": 0, "eval_rows": 1}
    base, _ = training_bytes(cfg, **sizes)
    for change in ({"rows": 128}, {"positions": 40}, {"prefix_keys": 100}, {"n_trainable": 10**6}):
        assert training_bytes(cfg, **{**sizes, **change})[0] > base, change  # training activations dominate
    assert training_bytes(cfg, **{**sizes, "rows": 1, "eval_rows": 3200})[0] > base  # the evaluation cache does
    # the evaluation cache of 100,000 prefix keys, 1,600 rows, 2 layers of width 64, float32: 2*2*1600*100020*64*4
    need, detail = training_bytes(cfg, 0, False, rows=64, positions=20, prefix_keys=100_000, eval_rows=1600)
    assert need >= 2 * 2 * 1600 * 100_020 * 64 * 4 and "evaluation cache of 1600 x 100020 keys" in detail
