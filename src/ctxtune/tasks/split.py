"""Stable train/test split of digit inputs by a deterministic 64-bit hash.

The authors split by ``hash(pickle.dumps(list)) % 4`` with Python's salted ``hash``, so train and
test membership changed between processes. ctxtune uses a fixed, unsalted hash instead, defined
identically in pure Python (:func:`stable_hash`) and vectorised in torch (:func:`stable_hash_torch`):

1. Pack the digits into one integer, most significant first, behind a leading 1 (so that inputs of
   different lengths never collide): ``key = 1``, then ``key = 16 * key + d`` for every digit ``d``.
   This is injective for digits in 0..15 and at most 15 digits (``key < 2**64``). Example:
   ``[3, 1, 4]`` packs to ``0x1314``.
2. Mix the key with the splitmix64 step, all arithmetic modulo 2**64::

       z = key + 0x9E3779B97F4A7C15
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       z = z ^ (z >> 31)

   (``>>`` is the logical shift of the unsigned value). The torch version uses int64 two's-complement
   wrap-around and masks the sign bits after each shift, so it holds the same 64 bits.
3. ``bucket = z mod 4``; bucket 0 is the test split (25% of inputs), buckets 1..3 are train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctxtune.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "test")
"""The valid split names."""

N_BUCKETS = 4
"""Number of hash buckets; one of them is the test split."""

TEST_BUCKET = 0
"""The bucket that forms the test split."""

MAX_DIGITS = 15
"""Longest input the packing in step 1 supports injectively."""

DIGIT_BASE = 16
"""Base of the packing; digits must lie in 0..DIGIT_BASE-1."""

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _to_signed(value: int) -> int:
    """Reinterpret an unsigned 64-bit integer as a signed (two's-complement) one."""
    return value - (1 << 64) if value >= (1 << 63) else value


def check_split(split: str) -> str:
    """Validate a split name.

    Args:
        split: "train" or "test".

    Returns:
        The split name unchanged.

    Raises:
        ConfigError: for any other value; the message names it.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'")
    return split


def _check_digits(digits: Sequence[int]) -> None:
    if len(digits) > MAX_DIGITS:
        raise ValueError(f"stable_hash supports at most {MAX_DIGITS} digits, got {len(digits)}")
    for d in digits:
        if not 0 <= int(d) < DIGIT_BASE:
            raise ValueError(f"stable_hash needs digits in 0..{DIGIT_BASE - 1}, got {d}")


def stable_hash(digits: Sequence[int]) -> int:
    """Pure-Python stable hash of a digit sequence (see the module docstring).

    Args:
        digits: at most 15 integers in 0..15.

    Returns:
        The unsigned 64-bit hash, in ``[0, 2**64)``.
    """
    _check_digits(digits)
    key = 1
    for d in digits:
        key = key * DIGIT_BASE + int(d)
    return splitmix64(key)


def splitmix64(key: int) -> int:
    """One splitmix64 output for state ``key`` (step 2 of the module docstring), pure Python.

    ``splitmix64(0) == 0xE220A8397B1DCDAF``, the first output of the reference generator seeded 0.

    Args:
        key: any integer; it is reduced modulo 2**64.

    Returns:
        The unsigned 64-bit result.
    """
    z = (key + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _logical_shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values by ``k`` bits, 1 <= k <= 63."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def stable_hash_torch(inputs: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`stable_hash` over rows.

    Args:
        inputs: [n, length] integer tensor, digits in 0..15, length <= 15.

    Returns:
        [n] int64 tensor holding the same 64 bits as :func:`stable_hash` of each row (values at or
        above 2**63 appear negative, as in two's complement).
    """
    if inputs.dim() != 2:
        raise ValueError(f"expected a [n, length] tensor, got shape {tuple(inputs.shape)}")
    n, length = inputs.shape
    if length > MAX_DIGITS:
        raise ValueError(f"stable_hash supports at most {MAX_DIGITS} digits, got {length}")
    x = inputs.to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= DIGIT_BASE):
        raise ValueError(f"stable_hash needs digits in 0..{DIGIT_BASE - 1}")
    weights = torch.tensor([DIGIT_BASE ** (length - 1 - i) for i in range(length)], dtype=torch.int64)
    key = (x * weights).sum(dim=1) + DIGIT_BASE**length  # [n]; < 2**60, no overflow
    z = key + _to_signed(_GAMMA)
    z = (z ^ _logical_shift_right(z, 30)) * _to_signed(_MUL1)
    z = (z ^ _logical_shift_right(z, 27)) * _to_signed(_MUL2)
    return z ^ _logical_shift_right(z, 31)


def split_bucket(digits: Sequence[int]) -> int:
    """The bucket (0..3) of one input; bucket 0 is the test split."""
    return stable_hash(digits) % N_BUCKETS


def split_bucket_torch(inputs: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`split_bucket`: [n, length] -> [n] int64 in 0..3."""
    # The low two bits of the two's-complement value equal those of the unsigned hash.
    return stable_hash_torch(inputs) & (N_BUCKETS - 1)


def split_of(digits: Sequence[int]) -> str:
    """The split ("train" or "test") an input belongs to."""
    return "test" if split_bucket(digits) == TEST_BUCKET else "train"


def in_split_torch(inputs: torch.Tensor, split: str) -> torch.Tensor:
    """Which rows of ``inputs`` belong to ``split``.

    Args:
        inputs: [n, length] integer tensor of digits.
        split: "train" or "test".

    Returns:
        [n] bool tensor.
    """
    check_split(split)
    is_test = split_bucket_torch(inputs) == TEST_BUCKET
    return is_test if split == "test" else ~is_test
