"""Adapter tensors read back from a file: wrong dtype or non-finite values are refused, naming the tensor
and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctxtune.errors import CheckpointError, ConfigError
from ctxtune.io import load_tensors, save_tensors
from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig

CFG = ModelConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=24)
METHODS = [("prefix", {"n_virtual": 2}), ("lora", {"rank": 1}), ("soft_prompt", {"n_virtual": 1}),
           ("prefix_kv", {"n_virtual": 1, "reparam_dim": 3}), ("full", {})]  # fmt: skip


def saved(tmp_path: Path, key: str, opts: dict, change) -> tuple:
    method = make_method(key, GPT(CFG), **opts)
    state = {k: change(v) for k, v in method.adapter_state().items()}
    path = tmp_path / "adapter.safetensors"
    save_tensors(path, state)
    return method, path


@pytest.mark.parametrize(("key", "opts"), METHODS)
def test_integer_tensors_are_refused_by_name_and_file(tmp_path: Path, key: str, opts: dict) -> None:
    method, path = saved(tmp_path, key, opts, lambda t: t.to(torch.int64))
    with pytest.raises(CheckpointError, match=rf"tensor '.+' in {path} has dtype int64, expected float32"):
        method.load_adapter_state(load_tensors(path))


@pytest.mark.parametrize(("key", "opts"), METHODS)
def test_all_nan_tensors_are_refused_by_name_and_file(tmp_path: Path, key: str, opts: dict) -> None:
    method, path = saved(tmp_path, key, opts, lambda t: torch.full_like(t, float("nan")))
    with pytest.raises(CheckpointError, match=rf"tensor '.+' in {path} holds NaN"):
        method.load_adapter_state(load_tensors(path))


def test_nan_refused_even_from_an_in_memory_state() -> None:
    method = make_method("prefix", GPT(CFG), n_virtual=1)
    state = {"hidden": torch.full_like(method.hidden, float("inf"))}
    with pytest.raises(CheckpointError, match="tensor 'hidden' in memory holds NaN or infinite"):
        method.load_adapter_state(state, source="memory")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="missing"):
        method.load_adapter_state({})


def test_float64_state_loads_into_a_float32_method(tmp_path: Path) -> None:
    method, path = saved(tmp_path, "prefix", {"n_virtual": 2}, lambda t: t.double() + 1)
    method.load_adapter_state(load_tensors(path))
    assert method.hidden.dtype == torch.float32


def test_hard_prompt_token_ids_must_stay_integers(tmp_path: Path) -> None:
    method = make_method("hard_prompt", GPT(CFG), tokens=[1, 2])
    save_tensors(tmp_path / "a.safetensors", {"prompt_tokens": method.prompt_tokens.float()})
    with pytest.raises(CheckpointError, match="'prompt_tokens' .* has dtype float32, expected int64"):
        method.load_adapter_state(load_tensors(tmp_path / "a.safetensors"))
