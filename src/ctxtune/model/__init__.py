"""The small GPT, its configuration and hook points."""

from ctxtune.model.config import ModelConfig
from ctxtune.model.gpt import GPT, KVCache, LayerPrefix
from ctxtune.model.hooks import HookedModule, HookPoint

__all__ = ["GPT", "HookPoint", "HookedModule", "KVCache", "LayerPrefix", "ModelConfig"]
