"""Shared mechanics of methods that insert embeddings into the sequence (prompts and suffixes).

`splice(...)` puts n_virtual embeddings before the original token at index `at` (0 for a prompt,
n_prompt for a suffix) and returns the logits alignment: original token i (i < at - 1) keeps its
output row i; from i = at - 1 on, the row that predicts token i + 1 is i + n_virtual (the last
virtual token predicts the first token after the insertion).
"""

from __future__ import annotations

import torch

from ctxtune.methods.base import Prepared
from ctxtune.model.gpt import GPT


def splice(model: GPT, tokens: torch.Tensor, virtual: torch.Tensor, at: int, policy: str) -> Prepared:
    """Insert `virtual` [batch or 1, n_virtual, d_model] before token index `at` of `tokens` [batch, seq]."""
    batch, seq = tokens.shape
    n_virtual = virtual.shape[1]
    content = model.embed_tokens(tokens)  # [batch, seq, d_model]
    virtual = virtual.expand(batch, -1, -1).to(content.dtype)
    embeds = torch.cat([content[:, :at], virtual, content[:, at:]], dim=1)  # [batch, seq + n_virtual, d_model]
    device = tokens.device
    idx = torch.arange(seq, device=device)
    if policy == "shift":
        content_pos = idx + n_virtual * (idx >= at)
        virtual_pos = torch.arange(at, at + n_virtual, device=device)
    else:  # "keep": content keeps its positions, virtual tokens take none
        content_pos = idx
        virtual_pos = torch.full((n_virtual,), -1, device=device)
    positions = torch.cat([content_pos[:at], virtual_pos, content_pos[at:]]).expand(batch, -1)
    out_index = torch.where(idx < at - 1, idx, idx + n_virtual)  # [seq]
    return Prepared(None, embeds, positions, None, out_index)


def splice_offset(policy: str, index: int, at: int, n_virtual: int) -> int:
    """Position offset of original token `index` under `policy` (for incremental decoding)."""
    return n_virtual if policy == "shift" and index >= at else 0
