"""Registry of methods by lowercase key: the key is the only source of truth."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ctxtune.errors import ConfigError
from ctxtune.limits import check_memory
from ctxtune.methods.base import Method
from ctxtune.model.gpt import GPT

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register under `cls.key` (unique, lowercase snake case)."""
    key = cls.key
    if not key or key != key.lower() or not key.replace("_", "").isalnum():
        raise ValueError(f"method key must be lowercase snake case, got {key!r}")
    if key in _REGISTRY:
        raise ValueError(f"method {key!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(key: str) -> type[Method]:
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {key!r}; known methods: {', '.join(list_methods())}")
    return _REGISTRY[key]


def make_method(key: str, model: GPT, n_adapters: int = 1, **options: Any) -> Method:
    """Build method `key` on `model` from keyword options (validated against its config)."""
    cls = get_method_class(key)
    config = cls.config_cls.from_dict(options, method=key)
    check_adapter_memory(cls, model, config, n_adapters)
    return cls(model, config, n_adapters=n_adapters)


def check_adapter_memory(cls: type[Method], model: GPT, config: Any, n_adapters: int) -> None:
    """Refuse adapters whose tensors alone cannot fit in memory, before allocating them."""
    shapes = SimpleNamespace(model=model, config=config, n_adapters=n_adapters)
    n = cls.expected_num_trainable(shapes)  # type: ignore[arg-type]  # closed form from the shapes alone
    size = next(model.parameters()).element_size()
    check_memory(size * n, f"method {cls.key!r} with {config.to_dict()}", f"{n:.3g} trainable values")
