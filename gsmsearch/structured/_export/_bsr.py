"""The "bsr" plan: each stage one block-sparse matrix (one Triton kernel launch on a GPU), t's
columns laid out in the order that stores the fewest blocks (see the package docstring)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from ._common import _Piece, _centre_order, _first_columns, _slices
from ._grouped import _grouped_order

# "bsr" block shapes, (along the features, along t's columns): what "auto" tries on a GPU, and
# the default.  t's side is short so that structures of few columns (a low-rank-like layer) do
# not pad t to a whole feature-sized block.
BSR_BLOCKS = ((64, 32), (128, 32), (128, 64), (128, 128))
BSR_BLOCK = (128, 32)


def _class_centre_order(intervals, size: int, octaves: int) -> np.ndarray:
    """Pieces sorted by class of interval length (``octaves`` octaves per class, longest class
    first), then by cyclic centre within a class."""
    lengths = np.array([min(length, size) for _, length in intervals])
    centre_rank = np.empty(len(intervals), dtype=np.int64)
    centre_rank[_centre_order(intervals, size)] = np.arange(len(intervals))
    classes = np.floor(np.log2(np.maximum(lengths, 1)) / octaves).astype(np.int64)
    return np.lexsort((centre_rank, -classes))


def _occupied_blocks(intervals, first, ranks, size: int, block: Tuple[int, int]) -> int:
    """Non-zero (features x t-columns) blocks of one "bsr" stage whose t columns are laid out
    as ``first`` gives (pieces' cyclic ``intervals`` along the features)."""
    features, columns = block
    occupied = set()
    for (start, length), a, rank in zip(intervals, first, ranks):
        feature_blocks = set()
        for begin, end, _, _ in _slices(start % size, start % size + min(length, size), size):
            feature_blocks.update(range(begin // features, (end - 1) // features + 1))
        for t_block in range(int(a) // columns, (int(a) + int(rank) - 1) // columns + 1):
            occupied.update((f, t_block) for f in feature_blocks)
    return len(occupied)


def _bsr_layout(intervals, ranks: np.ndarray, size: int, block: Tuple[int, int]) -> np.ndarray:
    """t's columns for one "bsr" stage (first column of each piece): of cyclic-centre order
    (the tiled plan's), the grouped plan's runs and length class first, the order storing the
    fewest blocks (a few long pieces among many short ones: in centre order every block of
    t-columns would hold a long piece and span the whole axis)."""
    best = None
    for order in (_centre_order(intervals, size), _grouped_order(intervals, ranks, size),
                  *(_class_centre_order(intervals, size, octaves) for octaves in (1, 2, 3))):
        first = _first_columns(order, ranks)
        count = _occupied_blocks(intervals, first, ranks, size, block)
        if best is None or count < best[0]:
            best = (count, first)
    return best[1]


class BsrPlan:
    """:class:`~gsmsearch.structured._export.ExportedGBLR`'s building and running of the bsr plan."""

    # the stage-2 kernel gathers t's columns through the permutation (True), or t' is written out
    # first (False: one more pass over t, contiguous loads in the kernel)
    bsr_gather = True

    def _build_bsr(self, pieces: List[_Piece], block: Tuple[int, int]) -> None:
        """The "bsr" plan (module docstring): the tiled plan's two stage layouts as dense factor
        matrices, stored as their non-zero (block x block) tiles."""
        from .._bsr_matrix import BlockSparseMatrix

        m, n = self.out_features, self.in_features
        ranks = np.array([p.rank for p in pieces], dtype=np.int64)
        self.inner = inner = int(ranks.sum())
        source = pieces[0].U if pieces else (self.bias if self.bias is not None else torch.zeros(()))
        dtype, device = source.dtype, source.device
        features, columns = block
        col_first = _bsr_layout([(p.col_start, p.c) for p in pieces], ranks, n, (features, columns))
        row_first = _bsr_layout([(p.row_start, p.h) for p in pieces], ranks, m, (features, columns))
        V = torch.zeros(n, max(inner, 1), dtype=dtype, device=device)  # stage 1: (in, inner)
        U = torch.zeros(max(inner, 1), m, dtype=dtype, device=device)  # stage 2: (inner, out)
        order = np.arange(max(inner, 1), dtype=np.int64)  # t' column j holds t column order[j]
        for i, p in enumerate(pieces):
            a, b = int(col_first[i]), int(row_first[i])
            V[torch.arange(p.col_start, p.col_start + p.c) % n, a : a + p.rank] = p.V
            U[b : b + p.rank, torch.arange(p.row_start, p.row_start + p.h) % m] = p.U.T
            order[b : b + p.rank] = np.arange(a, a + p.rank)
        self.stage1 = BlockSparseMatrix(V, (features, columns))
        self.stage2 = BlockSparseMatrix(U, (columns, features))
        # stage 1's column blocks are t's (narrow): a 64-wide one runs as the tensor cores' M side
        # (Hopper's wgmma takes M = 64; at 32 it would fall back to older instructions)
        self.stage1.tokens_as_n = 64 <= columns < features
        if not np.array_equal(order, np.arange(len(order))):
            self.t_order = torch.tensor(order, dtype=torch.int32, device=device)

    def _run_bsr(self, x2: torch.Tensor) -> torch.Tensor:
        """The bsr plan on the whole batch ``x2`` (T, in): two kernel launches, no chunks."""
        t = self.stage1(x2)
        if self.t_order is not None and not self.bsr_gather:  # t' written out, then read
            return self.stage2(t.index_select(1, self.t_order), bias=self.bias)
        return self.stage2(t, index=self.t_order, bias=self.bias)  # the kernel reads t permuted
