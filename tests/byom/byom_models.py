"""Helpers of the "bring your own model" tests: random Llama and GPT-2 folders saved with save_pretrained (with a
character tokenizer), adapters trained with PEFT itself, and a JSONL task file. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :=>+-.,?"
VOCAB = 64


def char_tokenizer() -> object:
    """A character-level fast tokenizer (BOS <s> before every text, ids < 48)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def train_peft(base: Path, config: object, out: Path, steps: int = 3) -> Path:
    """A PEFT adapter trained a few Adam steps on random sequences, saved with save_pretrained (safetensors)."""
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    tokens = torch.randint(3, 48, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = pm(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(out)
    return out


def write_task(path: Path, n: int = 80) -> Path:
    """A JSONL task: reverse a 2-4 letter word (prompts and completions of several lengths)."""
    gen = torch.Generator().manual_seed(5)
    lines = []
    for i in range(n):
        length = 2 + i % 3
        word = "".join("abcdefgh"[int(j)] for j in torch.randint(0, 8, (length,), generator=gen))
        lines.append(json.dumps({"prompt": f"rev {word}:", "completion": word[::-1]}))
    path.write_text("\n".join(dict.fromkeys(lines)) + "\n")
    return path


def greedy_peft(base: Path, adapter: Path | None, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation of one prompt by the base model with a PEFT adapter (PEFT's own forward)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model.eval()(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def labelled_task(path: Path, base: Path, adapter: Path | None, n: int = 24) -> tuple[Path, float, int]:
    """A JSONL task whose completions are the adapted model's own greedy output on every other prompt (and a wrong
    one on the rest): (the file, the test-split accuracy the adapted model must therefore score exactly, the
    number of test examples)."""
    from ctxtune.tasks.user import text_split

    lines, right, test = [], 0, 0
    for i in range(n):
        prompt = f"w{i}{'xyz'[: i % 3]}:"
        out = greedy_peft(base, adapter, [0] + [3 + CHARS.index(c) for c in prompt], 2)
        own = "".join(CHARS[t - 3] if 3 <= t < 3 + len(CHARS) else "" for t in out)
        correct = len(own) == 2 and i % 2 == 0
        completion = own if correct else "".join("q" if c != "q" else "r" for c in (own + "qq")[:2])
        lines.append(json.dumps({"prompt": prompt, "completion": completion}))
        if text_split(prompt) == "test":
            test, right = test + 1, right + correct
    path.write_text("\n".join(lines) + "\n")
    return path, right / test, test


def constant_task(path: Path, completion: str = " ok", n: int = 40) -> Path:
    """A JSONL task every prompt of which has the same completion (a tiny LoRA learns it in a few dozen steps)."""
    words = ["".join(CHARS[(7 * i + 3 * j) % 26] for j in range(2 + i % 3)) for i in range(n)]
    lines = [json.dumps({"prompt": f"say {w}:", "completion": completion}) for w in dict.fromkeys(words)]
    path.write_text("\n".join(lines) + "\n")
    return path
