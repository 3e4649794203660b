"""Hook points in the TransformerLens style, written from its description.

A `HookPoint` is an identity module placed on every activation. Hooks are temporary: they are added
inside the `hooks()` context manager (or by `run_with_cache`) and removed on exit, because hooks are
global state and a forgotten hook silently changes every later forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Iterable[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """Identity on its input; calls its hooks in order, each may return a replacement tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self._fns)

    def add(self, fn: HookFn) -> None:
        self._fns.append(fn)

    def clear(self) -> None:
        self._fns.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x


def _matcher(names: NameFilter) -> Callable[[str], bool]:
    if names is None:
        return lambda _name: True
    if isinstance(names, str):
        return lambda name: name == names
    if callable(names):
        return names
    wanted = set(names)
    return lambda name: name in wanted


class HookedModule(nn.Module):
    """Root module that names its hook points by module path (e.g. `blocks.0.attn.hook_pattern`)."""

    def setup_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.clear()

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = ()) -> Iterator[HookedModule]:
        """Add hooks for the duration of the block; all hooks are removed on exit."""
        try:
            for names, fn in fwd_hooks:
                match = _matcher(names)
                hits = [hp for name, hp in self.hook_dict.items() if match(name)]
                if isinstance(names, str) and not hits:
                    raise KeyError(f"no hook point named {names!r}")
                for hp in hits:
                    hp.add(fn)
            yield self
        finally:
            self.reset_hooks()

    def run_with_cache(
        self, *args: Any, names_filter: NameFilter = None, detach: bool = True, **kwargs: Any
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run forward and return (output, {hook name: activation})."""
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hp: HookPoint) -> None:
            cache[hp.name] = x.detach() if detach else x

        with self.hooks([(names_filter, save)]):
            out = self(*args, **kwargs)
        return out, cache
