"""BlockLowRankLinear: a b x b grid of blocks, each block of rank r' (Monarch-like).

Output and input are split into ``num_blocks`` contiguous blocks of balanced sizes (sizes differ
by at most one); block (i, j) = U_ij V_ij^T with U_ij (h_i x r'), V_ij (c_j x r').
Cost per token: ``sum_ij r' (h_i + c_j) = b r' (in + out)``, for any sizes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import (BlockLayout, blocks_to_dense, check_dense, check_int, dense_to_blocks,
                      finish_from_dense, fits, from_blocks, init_bias_like_linear, no_fit_error,
                      sqrt_split, to_blocks, top_energy, truncated_svd)

__all__ = ["BlockLowRankLinear"]


def max_block_rank(in_features: int, out_features: int, num_blocks: int) -> int:
    """r' can be at most the smallest block side (a larger rank adds cost, not expressivity)."""
    return min(in_features // num_blocks, out_features // num_blocks)


def blocklowrank_candidates(in_features: int, out_features: int, budget: float,
                            num_blocks: Optional[int] = None, rank: Optional[int] = None) -> List[Tuple[int, int]]:
    """The (b, r') pairs ``BlockLowRankLinear.from_dense`` scores at ``budget``, in its order:
    b = ``num_blocks`` if given, else every power of two b <= min(in, out); r' = ``rank`` if given,
    else the largest rank with b r' (in + out) within ``budget`` (capped at the smallest block
    side).  Raises when no pair fits."""
    most = min(in_features, out_features)
    if num_blocks is not None:
        block_choices = [check_int("num_blocks", num_blocks, 1, most)]
    else:
        block_choices = [2 ** e for e in range(int(math.log2(most)) + 1)]
    if rank is not None:
        rank = check_int("rank", rank, 1)
    candidates = []
    for b in block_choices:
        cap = max_block_rank(in_features, out_features, b)
        if rank is not None:
            if rank > cap:
                if num_blocks is not None:
                    raise ValueError(f"rank must be in [1, {cap}] (the smallest block side "
                                     f"with num_blocks={b}), got {rank}")
                continue
            r = rank if fits(b * rank * (in_features + out_features), budget, in_features,
                             out_features) else 0
        else:
            r = min(cap, int(budget * in_features * out_features
                             // (b * (in_features + out_features))) + 1)
            while r > 0 and not fits(b * r * (in_features + out_features), budget,
                                     in_features, out_features):
                r -= 1
        if r >= 1:
            candidates.append((int(b), int(r)))
    if not candidates:
        b = block_choices[0]
        cost = b * (rank or 1) * (in_features + out_features)
        raise no_fit_error("blocklowrank", budget, in_features, out_features, cost,
                           f"layer (num_blocks={b}, rank={rank or 1})")
    return candidates


@register_family("blocklowrank")
class BlockLowRankLinear(StructuredLinear):
    """Block-low-rank linear layer.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        num_blocks: b (grid side), in [1, min(in, out)].
        rank: r' per block, in [1, min(in // b, out // b)].
        bias: learn an additive bias.

    Parameters ``left`` (b, b, hmax, r') = U_ij and ``right`` (b, b, cmax, r') = V_ij, zero-padded
    to the largest block sizes when b does not divide in or out (padded slots get zero gradient;
    :meth:`num_params` counts only live entries).  Forward is two batched matmuls
    (z_ij = V_ij^T x_j, y_i = sum_j U_ij z_ij).
    Init: V ~ N(0, 1/c), U ~ N(0, 1/(3 b r')), so rows of W have expected squared norm 1/3 as
    under nn.Linear's default init.
    """

    def __init__(self, in_features: int, out_features: int, *, num_blocks: int, rank: int,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.num_blocks = check_int("num_blocks", num_blocks, 1,
                                    min(self.in_features, self.out_features),
                                    context=" (min(in_features, out_features))")
        b = self.num_blocks
        self.rank = check_int("rank", rank, 1, max_block_rank(self.in_features, self.out_features, b),
                              context=f" (the smallest block side with num_blocks={b})")
        self._rows = BlockLayout(self.out_features, b)
        self._cols = BlockLayout(self.in_features, b)
        self.register_buffer("_row_gather", self._rows.gather, persistent=False)  # (b, hmax)
        self.register_buffer("_row_take", self._rows.take, persistent=False)      # (out,)
        self.register_buffer("_col_gather", self._cols.gather, persistent=False)  # (b, cmax)
        self.left = nn.Parameter(torch.empty(b, b, self._rows.max_size, self.rank))   # U_ij
        self.right = nn.Parameter(torch.empty(b, b, self._cols.max_size, self.rank))  # V_ij
        self.reset_parameters()

    def reset_parameters(self) -> None:
        b = self.num_blocks
        row_live = (self._rows.gather < self.out_features).to(self.left.dtype)   # (b, hmax)
        col_live = (self._cols.gather < self.in_features).to(self.right.dtype)   # (b, cmax)
        with torch.no_grad():
            nn.init.normal_(self.right, std=(self.in_features / b) ** -0.5)
            nn.init.normal_(self.left, std=(3 * b * self.rank) ** -0.5)
            self.left.mul_(row_live[:, None, :, None].to(self.left.device))
            self.right.mul_(col_live[None, :, :, None].to(self.right.device))
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = to_blocks(x, self._col_gather, self._cols.even)               # (..., b, cmax)
        z = torch.einsum("...jc,ijcr->...ijr", xb, self.right)             # (..., b, b, r')
        yb = torch.einsum("...ijr,ijhr->...ih", z, self.left)              # (..., b, hmax)
        return self._add_bias(from_blocks(yb, self._row_take, self._rows.even))

    def to_dense(self) -> torch.Tensor:
        blocks = self.left @ self.right.transpose(-1, -2)                  # (b, b, hmax, cmax)
        return blocks_to_dense(blocks, self._row_gather[:, None, :, None],
                               self._col_gather[None, :, None, :], self.out_features,
                               self.in_features)

    def flops(self) -> int:
        return self.num_blocks * self.rank * (self.in_features + self.out_features)

    def num_params(self) -> int:
        b, r = self.num_blocks, self.rank
        padding = b * r * (self._rows.padding + self._cols.padding)
        return super().num_params() - padding

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "num_blocks": self.num_blocks, "rank": self.rank}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, num_blocks: Optional[int] = None,
                   rank: Optional[int] = None) -> "BlockLowRankLinear":
        """Truncated SVD of every block (one batched SVD), the Frobenius-best approximation for a
        given (b, r').

        Choice of (b, r'): with ``num_blocks`` given, b is fixed; otherwise every power of two
        b <= min(in, out) is a candidate.  For each b, r' = ``rank`` if given, else the largest
        rank with b r' (in + out) within ``budget`` (capped at the smallest block side).  Among
        the candidates, the one with the smallest approximation error (computed exactly from the
        blocks' Gram eigenvalues) wins; ties go to the smaller b.
        """
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        total = float(fitted.square().sum())
        best = None  # (error, b, r, blocks)
        for b, r in blocklowrank_candidates(in_features, out_features, budget, num_blocks, rank):
            rows = BlockLayout(out_features, b).gather[:, None, :, None]
            cols = BlockLayout(in_features, b).gather[None, :, None, :]
            blocks = dense_to_blocks(fitted, rows, cols)                  # (b, b, hmax, cmax)
            error = float(total - top_energy(blocks, r).sum())
            if best is None or error < best[0] - 1e-9 * total:
                best = (error, b, r, blocks)
        _, b, r, blocks = best
        layer = cls(in_features, out_features, num_blocks=b, rank=r, bias=bias is not None)
        left, right = sqrt_split(*truncated_svd(blocks, r), r)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
        return finish_from_dense(layer, weight, bias)
