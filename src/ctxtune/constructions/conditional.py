"""Conditional generation: one virtual token turns a hand-built GPT into any lookup table [V] -> [V]^N.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3, Theorem 2; this is the derived construction C
(shared/reference/paper.md §3.3): causal, residual, no norm, one attention layer with two heads, a
hidden ReLU layer selecting one table entry, and the triangular decoder of U in a second block. With
N = 1 it realises any of the V^V token-to-token maps; a hard first token selects at most V maps (here
exactly one: hard tokens carry no table).

Sequence: [virtual token, user token u, generated tokens...]; the output at position k + 1 (0-indexed)
is f(u)_k, k = 0..N-1, so N + 1 positions are used.

Precision range (measured with `ctxtune.constructions.capacity.find_precision_limit`: 64 random maps
plus the all-0 and all-(V-1) maps per size, sizes doubled until our time/memory cap): no failure in
float32 or float64 up to V = 256 at N = 2 and N = 32 at V = 8. The attention leak is below
(1 + B) N e^-beta < e^-5 / (2V) by the choice of beta, and the remaining rounding is O(eps B) against the
budget 1/(2V), so float32 holds until V ~ 1e6, far beyond the widths (V N + 3V + N + 4) we can build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ctxtune.constructions.decoding import (
    Construction,
    greedy_generate,
    write_triangular_decoder,
    zero_parameters,
)
from ctxtune.errors import CtxtuneError
from ctxtune.model.config import ModelConfig
from ctxtune.model.gpt import GPT

GATE_B = 4.0  # B: the gate's weight on the user and position indicators; the proof needs B > 1
BETA_MARGIN = 5.0  # beta = ln(2 V N (1 + B)) + BETA_MARGIN


@dataclass(frozen=True)
class Layout:
    """Residual slots of C: [table (VN) | cur (V) | user (V) | pos (N+1) | const | w | logits (V)]."""

    vocab: int
    length: int

    @property
    def table(self) -> int:
        return 0

    @property
    def cur(self) -> int:
        return self.vocab * self.length

    @property
    def user(self) -> int:
        return self.cur + self.vocab

    @property
    def pos(self) -> int:
        return self.user + self.vocab

    @property
    def const(self) -> int:
        return self.pos + self.length + 1

    @property
    def w(self) -> int:
        return self.const + 1

    @property
    def logits(self) -> int:
        return self.w + 1

    @property
    def d_model(self) -> int:
        return self.logits + self.vocab


@dataclass
class ConditionalConstruction(Construction):
    """Targets are maps [batch, V, N]: row u is f(u), the N tokens to emit after user token u."""

    def virtual_tokens(self, targets: torch.Tensor) -> torch.Tensor:
        targets = torch.as_tensor(targets)
        lay = Layout(self.vocab, self.length)
        out = torch.zeros(targets.shape[0], lay.d_model, dtype=self.dtype)  # [batch, d_model]
        table = targets.reshape(targets.shape[0], -1)  # [batch, V*N], entry u*N + k = f(u)_k
        out[:, : lay.cur] = table.to(self.dtype) / self.vocab
        out[:, lay.const] = 1.0
        return out

    def _run_first(self, first: torch.Tensor) -> torch.Tensor:
        """Outputs [batch, V, N] for first-token embeddings [batch, d_model], every user token."""
        batch, v = first.shape[0], self.vocab
        users = self.model.embed.weight.detach()  # [V, d_model]
        embeds = torch.stack(
            [first[:, None, :].expand(batch, v, -1), users[None].expand(batch, v, -1)], dim=2
        )  # [batch, V, 2, d_model]
        out = greedy_generate(self.model, embeds.reshape(batch * v, 2, -1), self.length)  # [batch*V, N]
        return out.reshape(batch, v, self.length)  # [batch, V, N]

    def run(self, targets: torch.Tensor) -> torch.Tensor:
        return self._run_first(self.virtual_tokens(targets))

    def reference(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(targets).long()  # f(u) for every u is the table itself

    def run_hard(self) -> torch.Tensor:
        return self._run_first(self.model.embed.weight.detach())  # [V, V, N]

    def random_targets(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n, self.vocab, self.length), generator=generator)

    def all_targets(self) -> torch.Tensor:
        cells = self.vocab * self.length
        grid = torch.cartesian_prod(*[torch.arange(self.vocab)] * cells).reshape(-1, cells)  # [V^(VN), VN]
        return grid.reshape(-1, self.vocab, self.length)  # [V^(VN), V, N]

    @property
    def n_targets(self) -> int:
        return self.vocab ** (self.vocab * self.length)


def default_beta(vocab: int, length: int, gate: float = GATE_B) -> float:
    """ln(2 V N (1 + B)) is the proof's bound; BETA_MARGIN more."""
    return math.log(2 * vocab * length * (1 + gate)) + BETA_MARGIN


def make_conditional(
    vocab: int,
    length: int = 1,
    dtype: torch.dtype = torch.float64,
    beta: float | None = None,
    gate: float = GATE_B,
) -> ConditionalConstruction:
    """Build construction C: a GPT in which one virtual token realises any map [V] -> [V]^N.

    Args:
        vocab: V >= 2.
        length: N >= 1 output tokens per user token.
        dtype: float64 (default) or float32.
        beta: inverse temperature of both heads (default `default_beta`).
        gate: B, the gate constant (the proof needs B > 1).

    Returns:
        The construction; `run(maps)` gives [batch, V, N] outputs for every user token.

    Example:
        >>> c = make_conditional(3, 1)
        >>> c.run(torch.tensor([[[2], [0], [1]]])).tolist()
        [[[2], [0], [1]]]
    """
    if vocab < 2:
        raise CtxtuneError(f"vocab must be at least 2, got {vocab}")
    if length < 1:
        raise CtxtuneError(f"length must be at least 1, got {length}")
    b = default_beta(vocab, length, gate) if beta is None else beta
    model = _make_c(vocab, length, b, gate).to(dtype).eval()
    return ConditionalConstruction("conditional", "residual", vocab, length, model, {"beta": b, "B": gate})


def c_config(vocab: int, length: int) -> ModelConfig:
    """Construction C's model shape: two blocks, two heads of width VN, residual width VN + 3V + N + 3."""
    v, n = vocab, length
    return ModelConfig(
        n_layers=2, n_heads=2, d_model=Layout(v, n).d_model, d_head=v * n, d_mlp=max(v * n, 3 * v), n_ctx=n + 1,
        d_vocab=v, norm="none", residual=True, pos="learned", act="relu", bias=True,
    )  # fmt: skip


@torch.no_grad()
def _make_c(vocab: int, length: int, beta: float, gate: float) -> GPT:
    v, n = vocab, length
    lay = Layout(v, n)
    d_head = v * n  # head 0 copies the VN table; head 1 the V-wide one-hot
    model = zero_parameters(GPT(c_config(vocab, length)).double())  # write in float64, cast at the end
    for tok in range(v):  # hard token: one-hot in the current-token block, constant 1
        model.embed.weight[tok, lay.cur + tok] = 1.0
        model.embed.weight[tok, lay.const] = 1.0
    for p in range(n + 1):
        model.pos_embed.weight[p, lay.pos + p] = 1.0
    attn = model.blocks[0].attn
    q_scale = beta * math.sqrt(d_head)  # cancels 1/sqrt(d_head): score = beta * (q . k)
    # Head 0: H = beta e_const e_pos0^T. Every query scores beta on position 0 (the virtual token) and
    # 0 elsewhere, so the mass on it is >= 1 - N e^-beta; W_O W_V copies the table block onto itself.
    attn.q_proj.weight[0, lay.const] = q_scale
    attn.k_proj.weight[0, lay.pos + 0] = 1.0
    for r in range(v * n):
        attn.v_proj.weight[r, lay.table + r] = 1.0
        attn.o_proj.weight[lay.table + r, r] = 1.0
    # Head 1: H = beta e_const e_pos1^T. Queries at positions >= 1 put mass >= 1 - N e^-beta on the user
    # token; W_O W_V copies its current-token one-hot into the user block. (Position 0 sees only itself
    # and copies its empty current-token block.)
    attn.q_proj.weight[d_head, lay.const] = q_scale
    attn.k_proj.weight[d_head, lay.pos + 1] = 1.0
    for t in range(v):
        attn.v_proj.weight[d_head + t, lay.cur + t] = 1.0
        attn.o_proj.weight[lay.user + t, d_head + t] = 1.0
    mlp = model.blocks[0].mlp
    assert mlp is not None
    # Gate, one ReLU per (u, k): h = ReLU(R_table(u,k) + B R_user(u) + B R_pos(k+1) - 2B).
    # At position k+1 with user u: R_table ~ f(u)_k / V, R_user(u) ~ 1, R_pos(k+1) = 1, so h is within
    # (1 + B) N e^-beta of f(u)_k / V, and beta > ln(2 V N (1 + B)) makes that < 1/(2V).
    # Any other (u', k'): at most one indicator is on, so the argument is <= R_table + B - 2B < 0
    # because R_table < 2 <= B (R_table reaches 2 only at position 0, where no position gate is on).
    for u in range(v):
        for k in range(n):
            unit = u * n + k
            mlp.fc_in.weight[unit, lay.table + unit] = 1.0
            mlp.fc_in.weight[unit, lay.user + u] = gate
            mlp.fc_in.weight[unit, lay.pos + k + 1] = gate
            mlp.fc_in.bias[unit] = -2.0 * gate
            mlp.fc_out.weight[lay.w, unit] = 1.0  # w = sum of the gates = f(u)_k / V
    mlp2 = model.blocks[1].mlp
    assert mlp2 is not None
    # Block 2: zero attention; the triangular decoder turns w into the one-hot of f(u)_k. QED.
    write_triangular_decoder(mlp2.fc_in, mlp2.fc_out, lay.w, lay.logits, v)
    for t in range(v):
        model.unembed.weight[t, lay.logits + t] = 1.0
    return model
