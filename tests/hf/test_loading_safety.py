"""Hugging Face folders: safetensors only (nothing unpickled), checked before transformers sees them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ctxtune.errors import CtxtuneError
from ctxtune.hf.loading import check_hf_folder, load_model


def save_tiny(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk that must never be unpickled")
    return folder


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    for target in (torch, pickle):
        monkeypatch.setattr(target, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)


def test_safetensors_load_with_a_pickle_beside_them(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    folder = save_tiny(tiny_llama, tmp_path / "m")
    forbid_unpickling(monkeypatch)
    model, _ = load_model(str(folder))
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_pickle_only_folder_is_refused_with_how_to_convert(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    folder = save_tiny(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    forbid_unpickling(monkeypatch)
    with pytest.raises(CtxtuneError, match=r"only pickled weights \(pytorch_model\.bin\).*safe_serialization=True"):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("change", "message"),
    [({"hidden_size": -5}, "hidden_size in .* must be a positive integer, got -5"),
     ({"num_hidden_layers": "2"}, "num_hidden_layers .* got '2'"), ({"vocab_size": 2**70}, "vocab_size")],
)  # fmt: skip
def test_config_sizes_are_checked_before_transformers(tiny_llama, tmp_path: Path, change: dict, message: str) -> None:
    folder = save_tiny(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CtxtuneError, match=message):
        check_hf_folder(folder, torch.float32)


def test_weights_beyond_memory_are_refused(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    folder = save_tiny(tiny_llama, tmp_path / "m")
    monkeypatch.setattr("ctxtune.limits.physical_memory", lambda: 1024)
    with pytest.raises(CtxtuneError, match=r"the model in .* needs at least about .* weights\), more than"):
        check_hf_folder(folder, torch.float32)
