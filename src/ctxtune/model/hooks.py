"""Hook points in the TransformerLens style, written from its description.

A `HookPoint` is an identity module placed on every activation. Hooks are temporary: they are added
inside the `hooks()` context manager (or by `run_with_hooks` / `run_with_cache`) and removed on exit,
because hooks are global state and a forgotten hook silently changes every later forward pass.

As in TransformerLens:
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", fn)])  # fn(activation, hook)
    logits, cache = model.run_with_cache(tokens)
    cache["pattern", 0]            # == cache["blocks.0.attn.hook_pattern"]
    cache["resid_post", -1]        # the last layer
    cache["normalized", 1, "ln2"]  # == cache["blocks.1.ln2.hook_normalized"]
A hook function gets (activation, hook point) and returns None (observe) or a replacement tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Iterable[str] | Callable[[str], bool] | None

# Short names of `act_name`, by the sub-module that holds them ("" = the block itself).
ATTN_NAMES = ("q", "k", "v", "rot_q", "rot_k", "prefix_k", "prefix_v", "attn_scores", "pattern", "z", "result")
BLOCK_NAMES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
MLP_NAMES = ("pre", "post")
NORM_NAMES = ("normalized",)
GLOBAL_NAMES = ("embed", "pos_embed")
ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "query": "q",
    "key": "k",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from a TransformerLens-style short name.

    Examples: ("pattern", 0) -> "blocks.0.attn.hook_pattern"; ("resid_pre", 2) -> "blocks.2.hook_resid_pre";
    ("pre", 1) -> "blocks.1.mlp.hook_pre"; ("normalized", 0, "ln1") -> "blocks.0.ln1.hook_normalized";
    ("normalized",) -> "ln_final.hook_normalized"; ("embed",) -> "hook_embed".

    Raises:
        KeyError: an unknown short name, or a per-layer name without a layer.
    """
    short = ALIASES.get(name, name)
    if short in GLOBAL_NAMES and layer is None:
        return f"hook_{short}"
    if short in NORM_NAMES and layer is None:
        return "ln_final.hook_normalized"
    if layer is None:
        raise KeyError(f"activation {name!r} is per layer: give a layer, e.g. cache[{name!r}, 0]")
    if short in ATTN_NAMES:
        return f"blocks.{layer}.attn.hook_{short}"
    if short in BLOCK_NAMES:
        return f"blocks.{layer}.hook_{short}"
    if short in MLP_NAMES:
        return f"blocks.{layer}.mlp.hook_{short}"
    if short in NORM_NAMES:
        if layer_type not in ("ln1", "ln2"):
            raise KeyError(f"say which norm: cache['normalized', {layer}, 'ln1'] or 'ln2', got {layer_type!r}")
        return f"blocks.{layer}.{layer_type}.hook_normalized"
    known = ATTN_NAMES + BLOCK_NAMES + MLP_NAMES + NORM_NAMES + GLOBAL_NAMES + tuple(ALIASES)
    raise KeyError(f"unknown activation name {name!r}; known: {', '.join(known)}")


class ActivationCache(dict):
    """{full hook name: activation}, also indexable TransformerLens-style: cache["pattern", 0].

    A plain dict in every other respect (keys(), items(), `in`, len). A negative layer counts from
    the end. `n_layers` is the model's layer count (for negative layers).
    """

    def __init__(self, data: dict[str, torch.Tensor] | None = None, n_layers: int = 0) -> None:
        super().__init__(data or {})
        self.n_layers = n_layers

    def full_name(self, key: str | tuple) -> str:
        """The full hook name a key means (a full name is returned unchanged)."""
        if isinstance(key, str):
            known = dict.__contains__(self, key) or "." in key or key.startswith("hook_")
            return key if known else act_name(key)
        name, layer, *rest = key if len(key) > 1 else (*key, None)
        if layer is not None and layer < 0:
            layer += self.n_layers
        return act_name(name, layer, *rest)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = self.full_name(key)
        if not dict.__contains__(self, name):
            raise KeyError(f"{name!r} is not in this cache (was it filtered out by names_filter?)")
        return dict.__getitem__(self, name)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, (str, tuple)):
            try:
                return dict.__contains__(self, self.full_name(key))
            except KeyError:
                return False
        return False


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
        """Add hooks for the duration of the block; all hooks are removed on exit.

        Raises:
            KeyError: a hook given by exact name that names no hook point.
        """
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

    def run_with_hooks(
        self, *args: Any, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs: Any
    ) -> Any:
        """Run forward with temporary hooks: [(hook name, list of names or name predicate, fn(act, hook))]."""
        with self.hooks(fwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self, *args: Any, names_filter: NameFilter = None, detach: bool = True, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """Run forward and return (output, ActivationCache {hook name: activation})."""
        cache = ActivationCache(n_layers=len(getattr(self, "blocks", ())))

        def save(x: torch.Tensor, hp: HookPoint) -> None:
            dict.__setitem__(cache, hp.name, x.detach() if detach else x)

        with self.hooks([(names_filter, save)]):
            out = self(*args, **kwargs)
        return out, cache
