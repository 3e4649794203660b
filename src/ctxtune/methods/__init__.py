"""Adaptation methods, registered by lowercase key.

Context methods: hard_prompt, in_context, soft_prompt, prefix (paper's tied hidden-state form),
prefix_kv (free K/V, PEFT's form), suffix. Weight methods: lora, full. And none (the model as it is).
"""

from ctxtune.methods import full, hard_prompt, lora, none, prefix, prefix_kv, soft_prompt, suffix  # noqa: F401
from ctxtune.methods.base import Method, MethodConfig, Prepared
from ctxtune.methods.hard_prompt import in_context_tokens
from ctxtune.methods.registry import get_method_class, list_methods, make_method, register_method

__all__ = [
    "Method",
    "MethodConfig",
    "Prepared",
    "get_method_class",
    "in_context_tokens",
    "list_methods",
    "make_method",
    "register_method",
]
