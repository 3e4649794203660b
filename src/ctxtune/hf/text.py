"""A Hugging Face model's tokenizer, offline, and the two encoders a text task needs (`ctxtune.tasks.user`).

The prompt gets the special tokens the tokenizer puts BEFORE a text (a BOS token, if it adds one; never
trailing ones such as an EOS some tokenizers append); the completion is encoded on its own, without any.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxtune.errors import CtxtuneError


def model_tokenizer(source: str) -> Any:
    """The tokenizer of a Hugging Face model: a folder, a .gguf file, or "smollm2" (offline, no weights loaded).

    Raises:
        CtxtuneError: the source holds no usable tokenizer (the message names it and how to add one).
    """
    from ctxtune.hf.loading import SMOLLM2, _transformers, cache_dir, load_config

    tf = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source == SMOLLM2:
        load_config(SMOLLM2)  # converts the shipped GGUF once into the cache folder (with its tokenizer)
        folder = cache_dir() / "smollm2-135m-instruct"
    else:
        path = Path(source).expanduser()
        folder = path.parent if path.suffix == ".gguf" else path
        if path.suffix == ".gguf":
            kwargs["gguf_file"] = path.name
    try:
        return tf.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a model without a usable tokenizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CtxtuneError(
            f"no usable tokenizer in {source}: a text task needs the model's tokenizer (save it next to the weights "
            f"with tokenizer.save_pretrained(folder)); {first}"
        ) from None


def encoders(tokenizer: Any) -> tuple[Callable[[str], list[int]], Callable[[str], list[int]]]:
    """(encode a prompt, encode a completion) with `tokenizer` (module docstring)."""

    def plain(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(text: str) -> list[int]:
        bare, full = plain(text), list(tokenizer(text, add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start] + bare  # the leading special tokens, none after the text
        return bare

    return prompt, plain
