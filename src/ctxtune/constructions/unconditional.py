"""Unconditional generation: one virtual token makes a hand-built GPT emit any sequence in [V]^N.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3, Theorem 1 (V^N completions from one virtual
token against at most V from one hard token). Two forms:

* "authors": the companion notebook's model (paper.md §3.1) in our GPT: one block, two heads, width 2N,
  no residual, no norm. Differences from the notebook: our attention is causal and scaled by a fixed
  1/sqrt(d_head) (the notebook scales by T/sqrt(n) with n the sequence length and has no mask), so a fixed
  inverse temperature beta is folded into W_Q; the read-out is the notebook's quadratic decoder with the
  k-independent terms dropped (our unembedding has no bias, a constant slot carries the -(k/V)^2 term).
* "residual": the derived construction U (paper.md §3.2): causal, one head with uniform attention,
  residual on, margin M; two blocks because the triangular decoder needs a second MLP layer.

Precision range (measured with `ctxtune.constructions.capacity.find_precision_limit`: 64 random targets
plus the all-0 and all-(V-1) targets per size, sizes doubled until the first failure or our time/memory
cap; every size below the stated one passed too):

* authors, float32: largest V = 2048 at N = 4 (fails at V = 4096: the decoder's logit gap is ~1/V^2
  against O(1) logits); N = 512 passes at V = 94 (cap).
  float64: no failure up to the caps V = 2^20 at N = 4 and N = 512 at V = 94.
* residual (U), float32 and float64: no failure up to the caps V = 1024 at N = 8, N = 256 at V = 94 and
  (V, N) = (1024, 128); float32 also passes (V, N) = (2048, 512). The float32 error of w grows like
  eps M N (z_q = u_q - M is multiplied back by q) against the budget 1/(2V), so V N of order 1e6-1e7 is
  where float32 should end; the decoder's width 3V (memory) binds first.

A hard first token (the zero embedding in both forms) yields exactly one completion.
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

BETA_MARGIN = 5.0  # beta = ln(4 V N) + BETA_MARGIN: a factor e^5 below the error budget 1/(2V)
MARGIN_M = 4.0  # construction U needs M >= 4 (see _write_u_readout)


@dataclass
class UnconditionalConstruction(Construction):
    """Targets are sequences [batch, N] of tokens in [V]; the model emits the target greedily."""

    content_slots: int = 0  # virtual token content lives in residual slots 0..N-1

    def virtual_tokens(self, targets: torch.Tensor) -> torch.Tensor:
        targets = torch.as_tensor(targets)
        d_model = self.model.cfg.d_model
        out = torch.zeros(targets.shape[0], d_model, dtype=self.dtype)  # [batch, d_model]
        out[:, : self.length] = targets.to(self.dtype) / self.vocab  # s_k = y_k / V
        return out

    def run(self, targets: torch.Tensor) -> torch.Tensor:
        embeds = self.virtual_tokens(targets)[:, None, :]  # [batch, 1, d_model]
        return greedy_generate(self.model, embeds, self.length)  # [batch, N]

    def reference(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(targets).long()

    def run_hard(self) -> torch.Tensor:
        embeds = self.model.embed.weight.detach()[:, None, :]  # [V, 1, d_model]
        return greedy_generate(self.model, embeds, self.length)  # [V, N]

    def random_targets(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n, self.length), generator=generator)

    def all_targets(self) -> torch.Tensor:
        grids = torch.cartesian_prod(*[torch.arange(self.vocab)] * self.length)
        return grids.reshape(-1, self.length)  # [V^N, N]

    @property
    def n_targets(self) -> int:
        return self.vocab**self.length


def _check_sizes(vocab: int, length: int) -> None:
    if vocab < 2:
        raise CtxtuneError(f"vocab must be at least 2, got {vocab}")
    if length < 1:
        raise CtxtuneError(f"length must be at least 1, got {length}")


def default_beta(vocab: int, length: int) -> float:
    """Inverse temperature of the authors' form: ln(4 V N) is the proof's bound, plus BETA_MARGIN."""
    return math.log(4 * vocab * max(length, 1)) + BETA_MARGIN


def make_unconditional(
    vocab: int,
    length: int,
    form: str = "residual",
    dtype: torch.dtype = torch.float64,
    beta: float | None = None,
    margin: float = MARGIN_M,
) -> UnconditionalConstruction:
    """Build a GPT in which one virtual token selects any of the V^N sequences of length N.

    Args:
        vocab: V >= 2.
        length: N >= 1.
        form: "authors" (two heads, width 2N, no residual) or "residual" (construction U).
        dtype: float64 (default) or float32.
        beta: inverse temperature of the authors' form (default `default_beta`); ignored by U.
        margin: M of construction U (the proof needs M >= 4); ignored by the authors' form.

    Returns:
        The construction; `run(targets)` generates, `reference(targets)` is what it must generate.

    Example:
        >>> c = make_unconditional(5, 3)
        >>> c.run(torch.tensor([[4, 0, 2]])).tolist()
        [[4, 0, 2]]
    """
    _check_sizes(vocab, length)
    if form == "authors":
        b = default_beta(vocab, length) if beta is None else beta
        model = _make_authors(vocab, length, b)
        constants = {"beta": b}
    elif form == "residual":
        model = _make_u(vocab, length, margin)
        constants = {"M": margin}
    else:
        raise CtxtuneError(f"unknown form {form!r}: expected 'authors' or 'residual'")
    model = model.to(dtype).eval()
    return UnconditionalConstruction("unconditional", form, vocab, length, model, constants)


def authors_config(vocab: int, length: int) -> ModelConfig:
    """The authors' form's model shape: one block, two heads of width N, residual width 2N."""
    n = length
    return ModelConfig(
        n_layers=1, n_heads=2, d_model=2 * n, d_head=n, d_mlp=n, n_ctx=n, d_vocab=vocab,
        norm="none", residual=False, pos="learned", act="relu", bias=True,
    )  # fmt: skip


def u_config(vocab: int, length: int) -> ModelConfig:
    """Construction U's model shape: two blocks, one head of width N, residual width N + 1 + V."""
    n = length
    return ModelConfig(
        n_layers=2, n_heads=1, d_model=n + 1 + vocab, d_head=n, d_mlp=max(n + 1, 3 * vocab), n_ctx=n,
        d_vocab=vocab, norm="none", residual=True, pos="learned", act="relu", bias=True,
    )  # fmt: skip


@torch.no_grad()
def _make_authors(vocab: int, length: int, beta: float) -> GPT:
    """Authors' form. Residual layout [content (N) | one-hot position (N)], d_head = N, two heads.

    Virtual token: content s_k = y_k / V, at position 0. Hard tokens embed to 0; position i adds e_{N+i}.
    """
    n = length
    model = zero_parameters(GPT(authors_config(vocab, length)).double())  # write in float64, cast at the end
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert mlp is not None
    q_scale = beta * math.sqrt(n)  # cancels the model's 1/sqrt(d_head): scores are beta * (q . k)
    for i in range(n):
        model.pos_embed.weight[i, n + i] = 1.0  # position one-hot
    for r in range(n):
        # Head 0 ("pos"): q = k = v = position one-hot; score(i, j) = beta [i == j], so position i puts
        # mass a_i = e^beta / (e^beta + i) >= 1 - i e^-beta on itself and returns ~e_i into slots 0..N-1.
        attn.q_proj.weight[r, n + r] = q_scale
        attn.k_proj.weight[r, n + r] = 1.0
        attn.v_proj.weight[r, n + r] = 1.0
        attn.o_proj.weight[r, r] = 1.0
        # Head 1 ("first"): q = beta * (sum of position slots) = beta at every position, k = [j == 0],
        # so every query puts mass b_i >= 1 - i e^-beta on the virtual token; v = content -> ~s.
        attn.q_proj.weight[n, n + r] = q_scale
        attn.v_proj.weight[n + r, r] = 1.0
        attn.o_proj.weight[r, n + r] = 1.0
    attn.k_proj.weight[n, n] = 1.0  # head 1 key: position-0 indicator
    # No residual: h_i = a_i e_i + (leak of head 0) + b_i s. Hard tokens have zero content, so head 1's
    # leak adds nothing. MLP: z_r = ReLU(h_r - 1) keeps a_i + b_i s_i - 1 at r = i, within
    # i e^-beta (1 + s_i) <= 2 (N - 1) e^-beta of s_i; for r != i, h_r <= e^-beta + s_r < 1 so z_r = 0.
    # beta > ln(4 V N) makes the error < 1/(2V). w = sum_r z_r (>= 0, so the notebook's second ReLU
    # is the identity and is dropped); a constant 1 goes to slot 1.
    for r in range(n):
        mlp.fc_in.weight[r, r] = 1.0
        mlp.fc_in.bias[r] = -1.0
        mlp.fc_out.weight[0, r] = 1.0
    mlp.fc_out.bias[1] = 1.0
    # Read-out: logit_k = (2k/V) w - (k/V)^2 = w^2 - (w - k/V)^2, so argmax is the grid point nearest w;
    # an error in w below 1/(2V) is tolerated. The logit gap is only ~1/V^2 (the float32 limit). QED.
    for k in range(vocab):
        model.unembed.weight[k, 0] = 2.0 * k / vocab
        model.unembed.weight[k, 1] = -((k / vocab) ** 2)
    return model


@torch.no_grad()
def _make_u(vocab: int, length: int, margin: float) -> GPT:
    """Construction U. Residual layout [u (N) | w (1) | logits (V)]; blocks: attention+read-out, decoder.

    Positions are 1-indexed in the comments (slot q-1 holds coordinate q), as in paper.md §3.2.
    """
    n, m = length, margin
    w_slot, logit_start = n, n + 1
    model = zero_parameters(GPT(u_config(vocab, length)).double())  # write in float64, cast at the end
    for i in range(n):
        model.pos_embed.weight[i, i] = m  # p_i = M e_i; hard tokens embed to 0
    attn = model.blocks[0].attn
    # H = 0: uniform causal attention; W_V = W_O = I on the u slots. With the residual,
    # u_i = x_i + (1/i) sum_{j<=i} x_j, where x_1 = s + M e_1 and x_j = M e_j (j >= 2).
    #   i >= 2: u_{i,i} = M + (s_i + M)/i; u_{i,q} = (s_q + M)/i < M (q < i) or s_q/i < M (q > i).
    #   i = 1:  u_{1,1} = 2 s_1 + 2M; u_{1,q} = 2 s_q < 2 <= M/2.
    for r in range(n):
        attn.v_proj.weight[r, r] = 1.0
        attn.o_proj.weight[r, r] = 1.0
    _write_u_readout(model, n, m, w_slot)
    mlp2 = model.blocks[1].mlp
    assert mlp2 is not None
    # Block 2: attention is all zero (adds nothing); the MLP decodes w = y_i / V into the one-hot e_{y_i}.
    write_triangular_decoder(mlp2.fc_in, mlp2.fc_out, w_slot, logit_start, vocab)
    for v in range(vocab):
        model.unembed.weight[v, logit_start + v] = 1.0
    return model


@torch.no_grad()
def _write_u_readout(model: GPT, n: int, m: float, w_slot: int) -> None:
    """Block 1's MLP of U: N + 1 ReLUs writing w = s_i at position i into `w_slot`."""
    mlp = model.blocks[0].mlp
    assert mlp is not None
    # z_q = ReLU(u_q - M), q = 2..N: only q = i survives at position i >= 2, z_i = (s_i + M)/i,
    # and i z_i - M = s_i. At position 1 every z_q = 0 (u_{1,q} < M).
    for q in range(2, n + 1):
        unit = q - 2
        mlp.fc_in.weight[unit, q - 1] = 1.0
        mlp.fc_in.bias[unit] = -m
        mlp.fc_out.weight[w_slot, unit] = float(q)
    # z_a = ReLU(u_1 - 1.5M), z_b = ReLU(u_1 - 1.5M - 2). At position 1, u_1 = 2 s_1 + 2M so
    # z_a = 2 s_1 + M/2 and z_b = 2 s_1 + M/2 - 2 >= 0 *because M >= 4*: z_a - z_b = 2. At i >= 2,
    # u_{i,1} <= (1 + M)/2 < 1.5M, so both are 0.
    za, zb = n - 1, n
    mlp.fc_in.weight[za, 0] = 1.0
    mlp.fc_in.bias[za] = -1.5 * m
    mlp.fc_in.weight[zb, 0] = 1.0
    mlp.fc_in.bias[zb] = -1.5 * m - 2.0
    # w = sum_q q z_q + 0.5 z_a + 0.375 M (z_a - z_b) - M: at i = 1, s_1 + M/4 + 3M/4 - M = s_1. QED.
    mlp.fc_out.weight[w_slot, za] = 0.5 + 0.375 * m
    mlp.fc_out.weight[w_slot, zb] = -0.375 * m
    mlp.fc_out.bias[w_slot] = -m


def encode_text(text: str, vocab: int = 94) -> torch.Tensor:
    """Printable ASCII to tokens, as the authors' demo: token = ord(c) - 32 (space is 0)."""
    tokens = [ord(c) - 32 for c in text]
    if any(not 0 <= t < vocab for t in tokens):
        raise CtxtuneError(f"text has characters outside the {vocab} printable ASCII tokens: {text!r}")
    return torch.tensor(tokens)


def decode_text(tokens: torch.Tensor) -> str:
    """Inverse of `encode_text`."""
    return "".join(chr(int(t) + 32) for t in tokens)
