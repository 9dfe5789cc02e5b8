"""What every export plan shares: the cost model, a component cropped to its intervals (a piece),
and the arithmetic of cyclic windows and of t's column layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

__all__ = ["PlanCost"]


@dataclass(frozen=True)
class PlanCost:
    """Cost model of the grouped plan, in multiply-adds per token.

    A GEMM of either stage, (tokens x window) by (window x rank) or (tokens x rank) by
    (rank x window) accumulated into the output, costs ``window * (rank + rank_offset)``: narrow
    GEMMs run far below peak (stage 1) or are bound by the read-modify-write of the output window
    (stage 2); fitting single-core fp32 MKL times at rank 16..256 gives an offset of about 32.
    Every GEMM call adds ``gemm_overhead_us * macs_per_us / tokens`` (about 35 GMAC/s, 20-30 us
    per call from Python); a window that wraps past the end runs as two calls.  Stage-1 ranks
    below ``min_rank`` are zero-padded to it (no slower, and the padding is counted).
    """

    tokens: int = 4096
    gemm_overhead_us: float = 25.0
    macs_per_us: float = 35_000.0
    rank_offset: int = 32
    min_rank: int = 16

    def overhead(self) -> float:
        return self.gemm_overhead_us * self.macs_per_us / max(1, self.tokens)


@dataclass
class _Piece:
    """One factored piece: rows [row_start, row_start + h), cols [col_start, col_start + c),
    cyclic; U (h, rho), V (c, rho); ``method_cost`` is the method's count for its component."""

    row_start: int
    col_start: int
    U: torch.Tensor
    V: torch.Tensor

    @property
    def h(self) -> int:
        return int(self.U.shape[0])

    @property
    def c(self) -> int:
        return int(self.V.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


def _slices(begin: int, end: int, size: int):
    """A window [begin, end) with end possibly past ``size`` as (array slice, window slice) pairs."""
    if end <= size:
        return ((begin, end, 0, end - begin),)
    return ((begin, size, 0, size - begin), (0, end - size, size - begin, end - begin))


def _window(starts: np.ndarray, ends: np.ndarray, size: int) -> Tuple[int, int]:
    """A run's window [begin, end): the union of its intervals, or the whole axis [0, size)."""
    begin, end = int(starts.min()), int(ends.max())
    return (0, size) if end - begin >= size else (begin, end)


def _positions(start: int, length: int, begin: int, end: int, size: int) -> torch.Tensor:
    """Offsets of a cyclic interval inside the window [begin, end) (cyclic when it is the axis)."""
    index = torch.arange(start, start + length)
    if (begin, end) == (0, size):
        return index % size
    return index - begin


def _centre_order(intervals, size: int) -> np.ndarray:
    """Pieces sorted by the cyclic centre of their (start, length) interval (full-axis ones first)."""
    starts = np.array([start for start, _ in intervals])
    lengths = np.array([length for _, length in intervals])
    centre = np.where(lengths >= size, -1.0, (starts + lengths / 2.0) % size)
    return np.lexsort((np.arange(len(starts)), centre))


def _first_columns(order: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """first[i]: the first of piece i's consecutive columns when pieces are laid out in ``order``."""
    first = np.empty(len(order), dtype=np.int64)
    first[order] = np.concatenate([[0], np.cumsum(ranks[order])[:-1]]) if len(order) else []
    return first
