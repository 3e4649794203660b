"""Evaluation: exact match of all greedy-decoded output tokens (the paper's metric).

`mode="greedy"` decodes with the KV cache, token by token. `mode="teacher"` takes one forward pass and
counts an example correct when every teacher-forced argmax equals the target: the same verdict,
since greedy decoding reproduces the target exactly when and only when each step's argmax, given the
correct earlier tokens, is correct (up to float ties between the two computation orders).
"""

from __future__ import annotations

import torch

from ctxtune.methods.base import Method
from ctxtune.tasks import Task
from ctxtune.train.seeds import eval_seed


@torch.no_grad()
def evaluate(
    method: Method,
    tasks: list[Task],
    n_examples: int,
    seed: int = 0,
    placeholders: int = 0,
    mode: str = "greedy",
    batch_size: int = 1600,
    adapters: list[int] | None = None,
) -> list[float]:
    """Exact-match accuracy of adapter `adapters[i]` on `tasks[i]` (test split), for every i.

    Examples of all adapters are batched together and routed through the bank.
    """
    adapters = list(range(len(tasks))) if adapters is None else adapters
    device = next(method.model.parameters()).device
    was_training = method.model.training
    method.model.eval()
    correct = [0] * len(tasks)
    try:
        for i, (task, k) in enumerate(zip(tasks, adapters, strict=True)):
            gen = torch.Generator().manual_seed(eval_seed(seed) + 7919 * i)
            done = 0
            while done < n_examples:
                n = min(batch_size, n_examples - done)
                for batch in task.make_batches(n, gen, split="test", placeholders=placeholders, start_index=done):
                    rows = batch.tokens.shape[0]  # one layout per batch (tasks with several lengths give several)
                    ids = torch.full((rows,), k, dtype=torch.long, device=device) if method.n_adapters > 1 else None
                    tokens = batch.tokens.to(device)
                    correct[i] += int(exact_match(method, tokens, batch.n_prompt, ids, mode).sum())
                done += n
    finally:
        method.model.train(was_training)
    return [c / n_examples for c in correct]


def exact_match(
    method: Method, tokens: torch.Tensor, n_prompt: int, ids: torch.Tensor | None, mode: str = "greedy"
) -> torch.Tensor:
    """[batch] bool: all output tokens right."""
    targets = tokens[:, n_prompt:]
    if mode == "greedy":
        out = method.generate(tokens[:, :n_prompt], targets.shape[1], ids)
        return (out == targets).all(dim=1)
    if mode != "teacher":
        raise ValueError(f"mode must be greedy or teacher, got {mode!r}")
    logits = method(tokens[:, :-1], ids, n_prompt=n_prompt)
    pred = logits[:, n_prompt - 1 :].argmax(-1)
    return (pred == targets).all(dim=1)
