"""The lm tasks (`ctxtune.tasks.lm`) registered on SmolLM2's tokenizer, built when a name is first looked up.

`ctxtune.tasks` may not load a tokenizer (that is `ctxtune.hf`'s, a layer above), so this module, in the lowest
layer that sees both, registers the family: importing `ctxtune.train` declares the names "lm_copy",
"lm_permute_told", ... (`ctxtune.tasks.lm.LM_TASK_NAMES`), and the first `get_task` of one in a process loads
SmolLM2's tokenizer (`ctxtune.hf.text.model_tokenizer`, offline) and builds all nine.
"""

from __future__ import annotations

from typing import Any

from ctxtune.errors import ConfigError, CtxtuneError
from ctxtune.tasks.base import register_task_family
from ctxtune.tasks.lm import LM_SOURCE, LM_TASK_NAMES, build_lm_task

_ENCODERS: dict[str, Any] = {}


def _encoders(source: str) -> Any:
    if source not in _ENCODERS:
        from ctxtune.hf.text import encoders, model_tokenizer

        _ENCODERS[source] = encoders(model_tokenizer(source))
    return _ENCODERS[source]


def build(name: str) -> Any:
    """The lm task `name` on SmolLM2's tokenizer."""
    try:
        encode_prompt, encode = _encoders(LM_SOURCE)
    except CtxtuneError as exc:
        raise ConfigError(f"task {name!r} is built on the tokenizer of {LM_SOURCE!r}: {exc}") from None
    return build_lm_task(name, encode_prompt, encode, LM_SOURCE)


register_task_family(LM_TASK_NAMES, build)
