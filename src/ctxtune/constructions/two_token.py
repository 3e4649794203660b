"""The authors' two-user-token demo, and where float precision ends it.

Reference: Petrov, Torr, Bibi (ICLR 2024), Section 3; companion notebook constructions.ipynb, Part 5
(shared/reference/paper.md §3.1). The demo realises a map m: [V] x [V] -> [V] conditioned on two user
tokens (a, b). The virtual token stores, for every first token a, ONE float that packs the whole
sub-map m(a, .) as a base-V expansion, x_a = sum_b m(a, b) V^-(b+1) (the notebook scales by V^V and uses
V = 10). After the attention layers have routed x_a and b to the last position, the notebook unpacks
digit b in Python; it is not done by layers.

Why we do not build it neurally: a float x_a must distinguish V^V sub-maps, i.e. carry V log2(V) bits
of mantissa, and a neural digit extractor (b steps of "multiply by V, subtract the floor", each floor a
staircase of steep ReLU pairs) needs every intermediate exactly. Whatever the layers, the packing fails
once V log2 V exceeds the mantissa. `find_packing_limit` measures it with the same arithmetic in the
given dtype (64 random sub-maps plus the all-0 and all-(V-1) ones per V):

* float32 (24-bit mantissa): largest V = 7 (7^7 ~ 2^19.6; V = 8 needs 2^24 cells plus the half-cell
  offset, and fails).
* float64 (53-bit mantissa): largest V = 13 (13^13 ~ 2^48.1; V = 14, 2^53.3, fails).

So the demo's V = 10 works in float64 (2^33.2) but not in float32, and no dtype in common use reaches a
printable-ASCII vocabulary. The conditional construction C (conditional.py) avoids packing: it spends
one residual slot per table entry (width V N + ...), so its precision needs are O(1/V), not V^-V.
"""

from __future__ import annotations

import torch


def pack_submap(digits: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Pack rows of digits [batch, V] (each in [V]) into floats x = sum_b d_b V^-(b+1), in `dtype`.

    Horner's rule from the last digit, every step rounded in `dtype` as a layer would be. The start
    value 1/2 puts x at the centre of its cell of width V^-V, so unpacking tolerates rounding below
    half a cell.
    """
    x = torch.full((digits.shape[0],), 0.5, dtype=dtype)  # [batch]
    for b in reversed(range(digits.shape[1])):
        x = (x + digits[:, b].to(dtype)) / vocab
    return x


def unpack_submap(x: torch.Tensor, vocab: int, n_digits: int) -> torch.Tensor:
    """Digits [batch, n_digits] of x by repeated "multiply by V, take the floor, keep the fraction"."""
    digits = []
    for _ in range(n_digits):
        y = x * vocab
        d = torch.floor(y).clamp(0, vocab - 1)
        digits.append(d.long())
        x = y - d
    return torch.stack(digits, dim=1)  # [batch, n_digits]


def find_packing_limit(dtype: torch.dtype, max_vocab: int = 20, samples: int = 64, seed: int = 0) -> int:
    """Largest V (from 2 up) for which every sampled sub-map survives pack -> unpack in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    largest = 1
    for vocab in range(2, max_vocab + 1):
        rand = torch.randint(0, vocab, (samples, vocab), generator=generator)
        digits = torch.cat([torch.zeros(1, vocab, dtype=torch.long), torch.full((1, vocab), vocab - 1), rand])
        back = unpack_submap(pack_submap(digits, vocab, dtype), vocab, vocab)
        if not torch.equal(back, digits):
            break
        largest = vocab
    return largest
