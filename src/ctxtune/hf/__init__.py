"""Hugging Face bridge: offline loading, context methods attached through attention hooks, PEFT adapters."""

from ctxtune.hf.attach import (
    Attachment,
    attach_prefix,
    attach_prefix_kv,
    attach_soft_prompt,
    disable,
    enable,
    hf_layout,
    random_attachment,
)
from ctxtune.hf.loading import load_model
from ctxtune.hf.peft_io import PeftAdapter, attach_peft, load_peft_adapter

__all__ = [
    "Attachment",
    "PeftAdapter",
    "attach_peft",
    "attach_prefix",
    "attach_prefix_kv",
    "attach_soft_prompt",
    "disable",
    "enable",
    "hf_layout",
    "load_model",
    "load_peft_adapter",
    "random_attachment",
]
