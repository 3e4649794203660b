"""Fixtures of the "bring your own model" tests (helpers in byom_models.py): tiny random Llama and GPT-2
folders with a character tokenizer, PEFT adapters trained with PEFT itself, a JSONL task file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import VOCAB, peft, save_model, train_peft, transformers, write_task  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama: 2 layers, 4 query heads, 2 key/value heads, rotary; weights scaled up so heads attend sharply."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return save_model(model, tmp_path_factory.mktemp("byom") / "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=1)
    return save_model(transformers.GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("byom") / "gpt2")


@pytest.fixture(scope="session")
def peft_adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT prefix tuning (P = 3), prompt tuning (P = 4) and LoRA (r = 4 on q, k, v, o) on the tiny Llama."""
    root = tmp_path_factory.mktemp("peft")
    return {
        "prefix": train_peft(llama_dir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                             root / "prefix"),
        "prompt": train_peft(llama_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                             root / "prompt"),
        "lora": train_peft(llama_dir, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                           root / "lora"),
    }


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    return write_task(tmp_path / "reverse.jsonl")


@pytest.fixture(autouse=True)
def forget_file_tasks() -> Iterator[None]:
    """Tasks made from JSONL files register globally by content name: drop them after each test, so the
    registry's contents tests elsewhere see the built-in tasks only."""
    yield
    from ctxtune.tasks.base import _REGISTRY

    for name in [n for n in _REGISTRY if n.startswith("file_")]:
        del _REGISTRY[name]
