"""ctxtune's tied prefix with `shift` computes what the authors' minGPT PrefixTrainer computes.

The authors (github.com/AleksandarPetrov/prefix-tuning-theory, minGPT/mingpt/model.py; described in
shared/reference/official-code.md, section 2.1) pretrain on sequences that start with P placeholder
tokens (id 0) and prefix-tune by feeding `[0]*P + content`. In every block l they replace the
attention INPUT at positions 0..P-1 by the trainable prefix[l] ([P, d_model]) BEFORE the block's
pre-attention norm, so the prefix passes through the frozen ln_1 and the Q/K/V projections (keys and
values tied through one vector, no positional embedding on it). The residual update is added to the
ORIGINAL stream (placeholder embeddings plus their positional embeddings); the MLP then runs as usual.

ctxtune's `prefix` method (hidden-state form) with `position_policy="shift"` instead feeds the content
alone, numbers it P..P+T-1 and hands each layer P hidden states that go through the same frozen norm
and K/V projections as extra keys/values without position.

The two agree on the content logits because (a) the content sits at the same positions P.. in both;
(b) content queries see the same keys/values (prefix rows, then content rows causally); (c) the
residual stream at the placeholder positions only ever reaches the attention input of those positions,
which the next block overwrites, so nothing the placeholders carry can reach the content.

This file re-implements the authors' block computation from the raw weights of a ctxtune GPT (its own
norm, attention and MLP arithmetic, nothing from ctxtune's forward) and asserts equal logits at the
content positions: 1e-6 in float32, 1e-12 in float64. Controls show the test can fail: content
numbered 0..T-1, or the prefix replacing the attention input after the norm, must not match.

A documented layout difference: the authors' LLaMA code (section 2.2) rotates the prefix keys by RoPE
at positions 0..P-1; ctxtune's prefix keys never rotate. On a rotary base the two agree for P = 1
(rotation by 0 is the identity) and differ for P > 1 (`test_rotary_prefix_keys_are_not_rotated`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctxtune.methods import make_method
from ctxtune.model import GPT, ModelConfig

N_CONTENT = 7  # T: content tokens per sequence
BATCH = 3
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
MISMATCH = 1e-3  # a wrong layout must miss by far more than the tolerance

CONFIGS = {
    "gelu-layernorm-4L": ModelConfig(n_layers=4, n_heads=4, d_model=32, n_ctx=24, d_vocab=10, dropout=0.1),
    "relu-layernorm-no-attn-norm-3L": ModelConfig(
        n_layers=3, n_heads=2, d_model=16, n_ctx=24, d_vocab=10, act="relu", attn_norm=False, dropout=0.1
    ),
    "gelu-rmsnorm-2L": ModelConfig(
        n_layers=2, n_heads=4, d_model=32, n_ctx=24, d_vocab=12, norm="rmsnorm", dropout=0.2
    ),
    "relu-rmsnorm-no-bias-3L": ModelConfig(
        n_layers=3, n_heads=4, d_model=16, n_ctx=24, d_vocab=10, norm="rmsnorm", act="relu", bias=False, dropout=0.1
    ),
}


# ----- the authors' computation, written from the weights ------------------------------------------------
@dataclass(frozen=True)
class AuthorsLayout:
    """How the reference lays out `[0]*P + content` and where the prefix enters.

    content_start: position id of the first content token (the authors: P; a base without placeholders: 0).
    prefix_after_norm: replace the normalised attention input instead of the pre-norm one (a wrong reading).
    rotate_prefix: on rotary bases, rotate the prefix rows at positions 0..P-1 (the authors' LLaMA code).
    """

    content_start: int
    prefix_after_norm: bool = False
    rotate_prefix: bool = False


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def normalise(x: torch.Tensor, site: nn.Module) -> torch.Tensor:
    """One norm site of the GPT (`kind` layernorm, rmsnorm or none) with its own weights and eps."""
    if site.kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), site.norm.weight, site.norm.bias, site.norm.eps)
    if site.kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + site.norm.eps) * site.norm.weight
    return x


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    batch, seq, width = x.shape
    return x.reshape(batch, seq, n_heads, width // n_heads).transpose(1, 2)  # [batch, n_heads, seq, d_head]


def merge_heads(z: torch.Tensor) -> torch.Tensor:
    batch, n_heads, seq, d_head = z.shape
    return z.transpose(1, 2).reshape(batch, seq, n_heads * d_head)  # [batch, seq, n_heads * d_head]


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float, rotated: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of [batch, n_heads, seq, d_head] at `positions` [seq], only rows where `rotated` [seq]."""
    d_head = x.shape[-1]
    freqs = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)  # [d_head/2]
    angles = positions.to(torch.float64)[:, None] * freqs * rotated[:, None]  # [seq, d_head/2]
    angles = torch.cat([angles, angles], dim=-1)  # [seq, d_head]
    half = d_head // 2
    swapped = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [batch, n_heads, seq, d_head]
    return x * angles.cos().to(x.dtype) + swapped * angles.sin().to(x.dtype)


def causal_self_attention(
    h: torch.Tensor, block: nn.Module, positions: torch.Tensor, rotated: torch.Tensor, cfg: ModelConfig
) -> torch.Tensor:
    """minGPT's causal attention over all rows of the (already normalised) input h [batch, seq, d_model]."""
    attn = block.attn
    q, k, v = (split_heads(linear(h, proj), cfg.n_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if cfg.pos == "rotary":
        q, k = (rotate(t, positions, cfg.rotary_base, rotated) for t in (q, k))
    seq = h.shape[1]
    scores = q @ k.transpose(-1, -2) / cfg.head_dim**0.5  # [batch, n_heads, seq, seq]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()  # [seq, seq] True = attend
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return linear(merge_heads(pattern @ v), attn.o_proj)  # [batch, seq, d_model]


def mlp(x: torch.Tensor, block: nn.Module, cfg: ModelConfig) -> torch.Tensor:
    pre = linear(x, block.mlp.fc_in)  # [batch, seq, d_mlp]
    post = F.gelu(pre, approximate="tanh") if cfg.act == "gelu" else F.relu(pre)
    return linear(post, block.mlp.fc_out)  # [batch, seq, d_model]


def authors_block(
    x: torch.Tensor,
    block: nn.Module,
    prefix: torch.Tensor,
    positions: torch.Tensor,
    layout: AuthorsLayout,
    cfg: ModelConfig,
) -> torch.Tensor:
    """One block: the attention input at rows 0..P-1 is the prefix [P, d_model]; the residual is x itself."""
    n_virtual = prefix.shape[0]
    rows = prefix.expand(x.shape[0], -1, -1)  # [batch, P, d_model]
    if layout.prefix_after_norm:
        h = torch.cat([rows, normalise(x[:, n_virtual:], block.ln1)], dim=1)  # [batch, P + T, d_model]
    else:
        h = normalise(torch.cat([rows, x[:, n_virtual:]], dim=1), block.ln1)  # [batch, P + T, d_model]
    rotated = torch.ones(x.shape[1], dtype=torch.bool)
    rotated[:n_virtual] = layout.rotate_prefix
    x = x + causal_self_attention(h, block, positions, rotated, cfg)
    return x + mlp(normalise(x, block.ln2), block, cfg)


def authors_logits(model: GPT, content: torch.Tensor, prefix: torch.Tensor, layout: AuthorsLayout) -> torch.Tensor:
    """Logits at the content positions [batch, T, d_vocab] of the authors' run on `[0]*P + content`.

    prefix: [n_layers, P, d_model], one row block per layer.
    """
    cfg = model.cfg
    n_virtual = prefix.shape[1]
    batch, n_content = content.shape
    placeholders = torch.zeros(batch, n_virtual, dtype=content.dtype)  # [batch, P] token id 0
    tokens = torch.cat([placeholders, content], dim=1)  # [batch, P + T]
    positions = torch.cat([torch.arange(n_virtual), torch.arange(n_content) + layout.content_start])  # [P + T]
    x = model.embed.weight[tokens]  # [batch, P + T, d_model]
    if cfg.pos == "learned":
        x = x + model.pos_embed.weight[positions]  # [batch, P + T, d_model]
    for layer, block in enumerate(model.blocks):
        x = authors_block(x, block, prefix[layer], positions, layout, cfg)
    logits = normalise(x, model.ln_final) @ model.unembed.weight.T  # [batch, P + T, d_vocab]
    return logits[:, n_virtual:]  # [batch, T, d_vocab]


# ----- ctxtune's side ---------------------------------------------------------------------------------
def spread_weights(model: GPT, seed: int) -> GPT:
    """Weights far from init (matrices ~ 1/sqrt(fan_in), non-zero biases, non-unit norm gains), so every
    term, positions and biases included, moves the logits well above the tolerance; the unembedding is
    scaled so the logits are of order 1 and the absolute float32 tolerance is a few ulps of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name in ("embed.weight", "pos_embed.weight"):
                p.copy_(noise)
            elif name == "unembed.weight":
                p.copy_(0.3 * noise / p.shape[1] ** 0.5)  # logits of order 1: the tolerance is ~ a few ulps
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def build(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> GPT:
    """A ctxtune GPT in eval mode (dropout configured but off), weights spread out."""
    return spread_weights(GPT(cfg), seed).to(dtype).eval()


def tied_prefix(model: GPT, n_virtual: int, policy: str, seed: int = 1) -> nn.Module:
    """ctxtune's `prefix` method with fresh N(0, 1) hidden states (the authors' randn init)."""
    method = make_method("prefix", model, n_virtual=n_virtual, position_policy=policy).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.hidden.copy_(torch.randn(method.hidden.shape, generator=gen, dtype=torch.float64))
    return method


def content_tokens(cfg: ModelConfig, seed: int = 2) -> torch.Tensor:
    """[batch, T] ids, including id 0 (the placeholder id is also a digit)."""
    return torch.randint(0, cfg.d_vocab, (BATCH, N_CONTENT), generator=torch.Generator().manual_seed(seed))


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def both_runs(
    cfg: ModelConfig, n_virtual: int, dtype: torch.dtype, policy: str, layout: AuthorsLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ctxtune logits, reference logits), both [batch, T, d_vocab], on shared weights and prefix."""
    model = build(cfg, dtype)
    method = tied_prefix(model, n_virtual, policy)
    content = content_tokens(cfg)
    ours = method(content)  # [batch, T, d_vocab]
    theirs = authors_logits(model, content, method.hidden[0], layout)  # [batch, T, d_vocab]
    return ours, theirs


# ----- the tests --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest and spares cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n_virtual", [1, 3, 10])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shift_prefix_equals_authors_prefix_trainer(name: str, n_virtual: int, dtype: torch.dtype) -> None:
    cfg = CONFIGS[name]
    ours, theirs = both_runs(cfg, n_virtual, dtype, "shift", AuthorsLayout(content_start=n_virtual))
    assert ours.shape == (BATCH, N_CONTENT, cfg.d_vocab)
    assert theirs.abs().max() > 0.1  # logits of a real scale, so the tolerance means something
    assert max_gap(ours, theirs) <= TOLERANCE[dtype]


@pytest.mark.parametrize("n_virtual", [1, 3, 10])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_content_at_zero_does_not_match_shift(name: str, n_virtual: int) -> None:
    """Control: the authors' computation with content numbered 0..T-1 misses the shifted ctxtune run."""
    ours, theirs = both_runs(CONFIGS[name], n_virtual, torch.float64, "shift", AuthorsLayout(content_start=0))
    assert max_gap(ours, theirs) > MISMATCH


@pytest.mark.parametrize("n_virtual", [1, 3, 10])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_keep_prefix_equals_authors_computation_on_a_base_without_placeholders(name: str, n_virtual: int) -> None:
    """`keep` is the same computation with content at 0..T-1 (a base pretrained without placeholders)."""
    ours, theirs = both_runs(CONFIGS[name], n_virtual, torch.float64, "keep", AuthorsLayout(content_start=0))
    assert max_gap(ours, theirs) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.attn_norm])
def test_prefix_replacing_the_normalised_input_does_not_match(name: str) -> None:
    """Control: the prefix enters BEFORE the frozen norm; replacing the norm's output instead is another
    computation (identical only on bases without a pre-attention norm)."""
    layout = AuthorsLayout(content_start=3, prefix_after_norm=True)
    ours, theirs = both_runs(CONFIGS[name], 3, torch.float64, "shift", layout)
    assert max_gap(ours, theirs) > MISMATCH


@pytest.mark.parametrize("n_virtual", [1, 3])
def test_rotary_prefix_keys_are_not_rotated(n_virtual: int) -> None:
    """ctxtune's prefix keys carry no position. The authors' LLaMA code rotates them at 0..P-1: the same
    for P = 1 (rotation by angle 0), different for P > 1. Without the prefix rotation they always agree."""
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=24, d_vocab=10, norm="rmsnorm", pos="rotary")
    unrotated = AuthorsLayout(content_start=n_virtual, rotate_prefix=False)
    ours, theirs = both_runs(cfg, n_virtual, torch.float64, "shift", unrotated)
    assert max_gap(ours, theirs) <= TOLERANCE[torch.float64]
    llama = AuthorsLayout(content_start=n_virtual, rotate_prefix=True)
    ours, theirs = both_runs(cfg, n_virtual, torch.float64, "shift", llama)
    if n_virtual == 1:
        assert max_gap(ours, theirs) <= TOLERANCE[torch.float64]
    else:
        assert max_gap(ours, theirs) > MISMATCH
