"""Every number of TrainConfig, ModelConfig and the method configs is checked where it enters."""

from __future__ import annotations

import math

import pytest

from ctxtune.errors import ConfigError
from ctxtune.limits import MAX_SEED, MAX_STEPS, model_parameters
from ctxtune.methods.lora import LoRAConfig
from ctxtune.methods.prefix import PrefixConfig
from ctxtune.methods.prefix_kv import PrefixKVConfig
from ctxtune.methods.soft_prompt import SoftPromptConfig
from ctxtune.model import GPT, ModelConfig
from ctxtune.train.config import TrainConfig

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    ("options", "message"),
    [({"lr": INF}, "train.lr must be a finite"), ({"lr": NAN}, "train.lr must be a finite"), ({"lr": 0.0}, "positive"),
     ({"weight_decay": NAN}, "weight_decay must be a finite"), ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
     ({"grad_clip": NAN}, "grad_clip must be a finite"), ({"grad_clip": -1.0}, "grad_clip must be >= 0"),
     ({"min_lr_ratio": -0.5}, r"min_lr_ratio must be in \[0, 1\]"), ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
     ({"min_lr_ratio": NAN}, "min_lr_ratio must be a finite"), ({"betas": (0.9, INF)}, "betas"),
     ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas"), ({"lr": 20.0, "weight_decay": 0.1}, "below 1"),
     ({"steps": MAX_STEPS + 1}, "steps must be at most"), ({"steps": 2**70}, "64-bit integer"),
     ({"seed": MAX_SEED + 1}, "seed must be at most"), ({"eval_examples": 10**8}, "eval_examples must be at most"),
     ({"checkpoint_every": 2**64}, "does not fit in a 64-bit integer"), ({"batch_size": 0}, "positive integer"),
     ({"warmup": -1}, "non-negative integer"), ({"steps": True}, "positive integer")],
)  # fmt: skip
def test_train_config_refuses(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_train_config_edges_accepted() -> None:
    TrainConfig(min_lr_ratio=0.0, grad_clip=0.0, weight_decay=0.0, betas=(0.0, 0.999), steps=MAX_STEPS, seed=MAX_SEED)
    TrainConfig(min_lr_ratio=1.0, lr=0.5, weight_decay=1.99)


@pytest.mark.parametrize(
    ("section", "data", "message"),
    [("train", {"lr": "fast"}, "train.lr must be float, got 'fast'"), ("train", {"lr": NAN}, "train.lr must be a fin"),
     ("train", {"seed": 2**80}, "train.seed = .* does not fit in a 64-bit integer"),
     ("train", {"betas": [0.9, INF]}, "train.betas must be a finite"),
     ("model", {"d_model": "x"}, "model.d_model must be int"), ("model", {"rotary_base": -1.0}, "rotary_base"),
     ("model", {"rotary_base": INF}, "rotary_base must be a finite"), ("model", {"dropout": NAN}, "dropout"),
     ("model", {"n_layers": 2**63}, "does not fit in a 64-bit integer"),
     ("model", {"d_model": 10**8, "n_heads": 1}, "needs at least about .* GiB .* of memory")],
)  # fmt: skip
def test_values_from_files_are_named_by_section_and_key(section: str, data: dict, message: str) -> None:
    cls = TrainConfig if section == "train" else ModelConfig
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(data)


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [(LoRAConfig, {"alpha": NAN}, "alpha must be a finite"), (LoRAConfig, {"alpha": 0.0}, "LoRA alpha"),
     (LoRAConfig, {"alpha": -1.0}, "LoRA alpha"), (LoRAConfig, {"targets": ["o", "o"]}, "more than once"),
     (LoRAConfig, {"rank": 2**64}, "64-bit"), (PrefixConfig, {"init_std": NAN}, "init_std"),
     (PrefixConfig, {"init_std": -1.0}, "init_std"), (PrefixConfig, {"n_virtual": 2**64}, "64-bit"),
     (SoftPromptConfig, {"init_std": INF}, "init_std"), (PrefixKVConfig, {"reparam_dim": -1}, "reparam_dim")],
)  # fmt: skip
def test_method_configs_refuse(cls: type, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(options)


@pytest.mark.parametrize(
    "options",
    [{}, {"norm": "rmsnorm", "bias": False}, {"pos": "rotary", "tie_embeddings": True},
     {"mlp": False, "attn_norm": False}, {"norm": "none", "d_head": 8, "d_mlp": 10}, {"pos": "none", "d_head": 5}],
)  # fmt: skip
def test_closed_form_parameter_count_matches_the_model(options: dict) -> None:
    cfg = ModelConfig(**options)
    assert model_parameters(cfg) == GPT(cfg).num_parameters()
