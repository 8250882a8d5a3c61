"""DeepSpeed-Chat's ``data_split``: each dataset is shuffled by seed and cut by cumulative weights into the three
steps' slices. Pure functions of (n, weights, seed, key): every rank and node computes the same partition, whatever
the world size."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def derived_seed(seed: int, key: str) -> int:
    """A 32-bit seed mixing the user's seed with a dataset key, so two datasets are not shuffled alike."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def permutation(n: int, seed: int, key: str) -> list[int]:
    """A seeded permutation of range(n). numpy's legacy RandomState stream is frozen across numpy versions, which
    keeps splits (and so which rows each stage saw) stable when the image is rebuilt."""
    return np.random.RandomState(derived_seed(seed, key)).permutation(n).tolist()


def split_bounds(n: int, weights: Sequence[float]) -> list[int]:
    """Cut points [0, b1, ..., n] for normalised cumulative weights (rounded; the last is always n)."""
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split weights must be non-negative with a positive sum, got {tuple(weights)}")
    total = float(sum(weights))
    bounds = [0]
    acc = 0.0
    for w in weights[:-1]:
        acc += w
        bounds.append(min(n, int(round(acc / total * n))))
    bounds.append(n)
    return bounds


def split_indices(n: int, weights: tuple[float, float, float], seed: int,
                  key: str) -> tuple[list[int], list[int], list[int]]:
    """Row indices of a dataset of n rows for step 1 (SFT), 2 (reward) and 3 (PPO): disjoint, together covering
    range(n), each in shuffled order (so a prefix of a slice is a random sample of it)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(weights) != 3:
        raise ValueError(f"split needs three weights (SFT, reward, PPO), got {tuple(weights)}")
    perm = permutation(n, seed, key)
    b = split_bounds(n, weights)
    return perm[b[0]:b[1]], perm[b[1]:b[2]], perm[b[2]:b[3]]


def eval_count(n: int, eval_fraction: float) -> int:
    """Rows held out for eval from a slice of n rows: round(n * fraction), at least 1 when the fraction is
    positive and the slice has 2 rows or more, never all of them."""
    if eval_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(n * eval_fraction))))
