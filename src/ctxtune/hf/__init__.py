"""Hugging Face bridge: offline loading, models wrapped for ctxtune's methods and checks, PEFT adapters."""

from ctxtune.hf.backbone import HFBackbone, HFConfig, capture_backbone, disable, enable, hf_layout, load_backbone
from ctxtune.hf.loading import load_model
from ctxtune.hf.peft_io import PeftAdapter, load_peft_adapter, peft_method

__all__ = [
    "HFBackbone",
    "HFConfig",
    "PeftAdapter",
    "capture_backbone",
    "disable",
    "enable",
    "hf_layout",
    "load_backbone",
    "load_model",
    "load_peft_adapter",
    "peft_method",
]
