"""Full fine-tuning: every weight of the model is trainable (the baseline; also used to pretrain).

Trainable: all unique model parameters (tied tensors once). The base is snapshotted at attach and
restored bit-exactly by `detach()`; the adapter state is the whole model state. No adapter banks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctxtune.errors import CheckpointError
from ctxtune.methods.base import Method, MethodConfig, check_tensor_values
from ctxtune.methods.registry import register_method
from ctxtune.model.gpt import GPT


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    pass


@register_method
class Full(Method):
    key = "full"
    config_cls = FullConfig
    supports_bank = False
    saves = "model"
    identity = "none"
    train_defaults = {"weight_decay": 0.1, "decay_matrices_only": True}

    def __init__(self, model: GPT, config: FullConfig, n_adapters: int = 1) -> None:
        super().__init__(model, config, n_adapters)
        self._snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list({id(p): p for p in self.model.parameters()}.values())

    def expected_num_trainable(self) -> int:
        return self.model.num_parameters()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return model_state(self.model)

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
        load_model_state(self.model, state, source)

    def detach(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self._snapshot[name])
        super().detach()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Model tensors with tied weights stored once, under their first name (safetensors refuses shared storage)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach()
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Load a model state, naming any missing, unexpected, mis-shaped, mistyped or non-finite tensor
    and the file (`source`, default the TensorFile's path)."""
    source = source if source is not None else getattr(state, "path", None)
    where = f" in {source}" if source is not None else ""
    own = model_state(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint{where} does not fit the model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r}{where} has shape {list(tensor.shape)}, "
                f"the model expects {list(own[name].shape)}"
            )
        check_tensor_values(name, tensor, own[name].dtype, where)
    model.load_state_dict(state, strict=False)
