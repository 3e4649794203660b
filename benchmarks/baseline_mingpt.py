"""A plain single-run PyTorch training loop in the style of the authors' minGPT trainer (the baseline).

Written for this benchmark from the description in reference/official-code.md (sections 2.1 and 4), not
copied. What it keeps from that code, because it is what a user of the authors' repository runs:

- a GPT-2-style decoder: learned token and position embeddings, pre-LayerNorm blocks, one fused QKV
  `Linear(d, 3d)`, an explicit causal softmax (scores, `masked_fill` from a registered lower-triangular
  buffer, softmax, attention dropout, `att @ v`), an output projection, an MLP d -> 4d -> d with the
  tanh-GELU written out as a formula (minGPT's `NewGELU`), dropout, a final LayerNorm and a bias-free
  LM head; init N(0, 0.02), residual projections 0.02/sqrt(2L); cross-entropy with ignore index -1;
- the trainer: a `DataLoader` over a dataset with a replacement `RandomSampler` and 0 workers, one
  Python step per batch (forward, `zero_grad(set_to_none=True)`, backward, `clip_grad_norm_(1.0)`,
  AdamW step), AdamW (0.9, 0.95) with weight decay only on Linear weights;
- the prefix trainer: a prefix tensor [L, P, d] (randn) that replaces the attention input at the P
  placeholder positions of every block (tied K/V through the frozen ln_1 and c_attn), the model in eval
  mode, AdamW over the prefix only, clip 1.0, content carried after P placeholder zeros.

The data are the same task sequences our trainer sees (ctxtune's vectorised generator, drawn once into
a pool the dataset indexes), so the comparison is about the model and the loop, not about the authors'
per-example Python data generator (which would make the baseline slower still).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler


@dataclass(frozen=True)
class MinGPTConfig:
    """Size of the minGPT-style model (dropout 0.1 as the authors' pretraining)."""

    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 96
    vocab_size: int = 10
    block_size: int = 32
    dropout: float = 0.1


class NewGELU(nn.Module):
    """The tanh approximation of GELU written out, as minGPT does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    """Fused QKV projection and an explicit masked softmax."""

    def __init__(self, cfg: MinGPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        tril = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", tril.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, nh, T, hs]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # [B, nh, T, T]
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: MinGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.ModuleDict(
            dict(
                c_fc=nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                c_proj=nn.Linear(4 * cfg.n_embd, cfg.n_embd),
                act=NewGELU(),
                dropout=nn.Dropout(cfg.dropout),
            )
        )

    def mlpf(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """prefix: [P, C] replaces the attention input at the first P (placeholder) positions."""
        if prefix is None:
            x = x + self.attn(self.ln_1(x))
        else:
            P = prefix.shape[0]
            attn_in = torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, P:]], dim=1)
            x = x + self.attn(self.ln_1(attn_in))
        return x + self.mlpf(self.ln_2(x))


class MinGPT(nn.Module):
    """minGPT-style decoder; `forward(idx, targets, prefix)` returns (logits, loss)."""

    def __init__(self, cfg: MinGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)

    def configure_optimizers(self, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
        """AdamW (0.9, 0.95): weight decay on Linear weights only (minGPT's rule)."""
        decay, no_decay = set(), set()
        for mn, m in self.named_modules():
            for pn, _ in m.named_parameters(recurse=False):
                fpn = f"{mn}.{pn}" if mn else pn
                (decay if pn.endswith("weight") and isinstance(m, nn.Linear) else no_decay).add(fpn)
        params = dict(self.named_parameters())
        groups = [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T]; prefix [L, P, C] or None. Returns logits [B, T, V] and the loss (ignore index -1)."""
        T = idx.shape[1]
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, None if prefix is None else prefix[layer])
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class PoolDataset(Dataset):
    """(x, y) pairs indexed from a pre-drawn pool of sequences; y is -1 off the output positions."""

    def __init__(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> None:
        self.x = tokens[:, :-1].contiguous()
        self.y = tokens[:, 1:].masked_fill(~loss_mask[:, 1:], -1).contiguous()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class MinGPTTrainer:
    """The authors'-style loop: one run, one Python step per batch from a DataLoader.

    Args:
        model: the model.
        dataset: (x, y) pairs.
        batch_size: examples per step (64 in the paper).
        lr: learning rate (constant).
        prefix: if given ([L, P, C]), train only it with the model frozen in eval mode (PrefixTrainer);
            otherwise train every weight in train mode (Trainer).
    """

    def __init__(
        self,
        model: MinGPT,
        dataset: PoolDataset,
        batch_size: int = 64,
        lr: float = 5e-4,
        prefix: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.prefix = model, prefix
        if prefix is None:
            model.train()
            self.optimizer = model.configure_optimizers(lr)
            self.params = list(model.parameters())
        else:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            prefix.requires_grad_(True)
            self.optimizer = torch.optim.AdamW([prefix], lr=lr, betas=(0.9, 0.95))
            self.params = [prefix]
        gen = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, replacement=True, num_samples=int(1e10), generator=gen)
        self.loader = DataLoader(
            dataset, sampler=sampler, shuffle=False, pin_memory=False, batch_size=batch_size, num_workers=0
        )
        self.iter = iter(self.loader)
        self.batch_size = batch_size

    def step(self) -> float:
        """One training step; returns the loss."""
        x, y = next(self.iter)
        _, loss = self.model(x, y, self.prefix)
        assert loss is not None
        self.model.zero_grad(set_to_none=True)
        if self.prefix is not None:
            self.prefix.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()
