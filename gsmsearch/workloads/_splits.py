"""Deterministic train/val/test index splits (plain and stratified), fixed by a seed."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = ["split_indices", "stratified_split_indices"]

Indices = Tuple[np.ndarray, np.ndarray, np.ndarray]


def _counts(n: int, fractions: Sequence[float]) -> Tuple[int, int]:
    """(n_train, n_val) for ``n`` items; test takes the rest."""
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    return n_train, min(n_val, n - n_train)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> Indices:
    """A random partition of ``range(n)`` into train/val/test (each sorted), fixed by ``seed``."""
    order = np.random.RandomState(seed).permutation(n)
    n_train, n_val = _counts(n, fractions)
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return tuple(np.sort(part) for part in parts)  # type: ignore[return-value]


def stratified_split_indices(labels: Sequence[int], fractions: Sequence[float], seed: int) -> Indices:
    """Like :func:`split_indices`, but each class is split in the same proportions."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    parts = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train, n_val = _counts(len(members), fractions)
        parts[0].append(members[:n_train])
        parts[1].append(members[n_train : n_train + n_val])
        parts[2].append(members[n_train + n_val :])
    return tuple(np.sort(np.concatenate(part)) for part in parts)  # type: ignore[return-value]
