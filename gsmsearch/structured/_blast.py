"""BlastLinear: Block-Level Adaptive STructured matrix (Lee et al. 2024, "BLAST").

Output and input are split into b = ``num_blocks`` contiguous blocks of balanced sizes (sizes
differ by at most one).  Block (i, j) is A_ij = U_i diag(s_ij) V_j^T with U_i (h_i x r) shared
along block row i, V_j (c_j x r) shared along block column j and s_ij (r,) the block's own
coupling.  Parameters: r (in + out) + r b^2.
Cost per token: ``r (in + out) + r b^2`` multiply-adds:
    z_j = V_j^T x_j  (r in),   w_i = sum_j s_ij * z_j  (r b^2),   y_i = U_i w_i  (r out).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import (BlockLayout, blocks_to_dense, check_dense, check_int, dense_to_blocks,
                      finish_from_dense, fits, from_blocks, init_bias_like_linear, no_fit_error,
                      to_blocks, truncated_svd)

__all__ = ["BlastLinear"]


def blast_flops(in_features: int, out_features: int, num_blocks: int, rank: int) -> int:
    return rank * (in_features + out_features) + rank * num_blocks ** 2


@register_family("blast")
class BlastLinear(StructuredLinear):
    """BLAST linear layer.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        num_blocks: b, in [1, min(in, out)].
        rank: r, in [1, min(in, out)].
        bias: learn an additive bias.

    Parameters ``left`` (b, hmax, r) = U_i, ``right`` (b, cmax, r) = V_j, ``coupling`` (b, b, r)
    = s_ij; U and V are zero-padded to the largest block sizes when b does not divide out or in
    (padded slots get zero gradient; :meth:`num_params` counts live entries only).
    Init: V ~ N(0, 1/c), s ~ N(0, 1/b), U ~ N(0, 1/(3 r)), so rows of W have expected squared
    norm 1/3 as under nn.Linear's default init.
    """

    def __init__(self, in_features: int, out_features: int, *, num_blocks: int, rank: int,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        most = min(self.in_features, self.out_features)
        self.num_blocks = check_int("num_blocks", num_blocks, 1, most,
                                    context=" (min(in_features, out_features))")
        self.rank = check_int("rank", rank, 1, most, context=" (min(in_features, out_features))")
        b, r = self.num_blocks, self.rank
        self._rows = BlockLayout(self.out_features, b)
        self._cols = BlockLayout(self.in_features, b)
        self.register_buffer("_row_gather", self._rows.gather, persistent=False)  # (b, hmax)
        self.register_buffer("_row_take", self._rows.take, persistent=False)      # (out,)
        self.register_buffer("_col_gather", self._cols.gather, persistent=False)  # (b, cmax)
        self.left = nn.Parameter(torch.empty(b, self._rows.max_size, r))    # U_i
        self.right = nn.Parameter(torch.empty(b, self._cols.max_size, r))   # V_j
        self.coupling = nn.Parameter(torch.empty(b, b, r))                  # s_ij
        self.reset_parameters()

    def _live(self):
        """(b, hmax, 1) and (b, cmax, 1) 0/1 masks of the live (unpadded) rows of U and V."""
        rows = (self._row_gather < self.out_features)[:, :, None]
        cols = (self._col_gather < self.in_features)[:, :, None]
        return rows, cols

    def reset_parameters(self) -> None:
        b = self.num_blocks
        rows, cols = self._live()
        with torch.no_grad():
            nn.init.normal_(self.right, std=(self.in_features / b) ** -0.5)
            nn.init.normal_(self.coupling, std=b ** -0.5)
            nn.init.normal_(self.left, std=(3 * self.rank) ** -0.5)
            self.left.mul_(rows)
            self.right.mul_(cols)
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = to_blocks(x, self._col_gather, self._cols.even)            # (..., b, cmax)
        lead, (b, cmax) = xb.shape[:-2], xb.shape[-2:]
        z = torch.bmm(xb.reshape(-1, b, cmax).transpose(0, 1), self.right)  # (b, T, r)  z_j = V_j^T x_j
        w = torch.einsum("jtr,ijr->itr", z, self.coupling)              # (b, T, r)  w_i = sum_j s_ij z_j
        y = torch.bmm(w, self.left.transpose(1, 2))                     # (b, T, hmax)  y_i = U_i w_i
        yb = y.transpose(0, 1).reshape(*lead, b, y.shape[-1])
        return self._add_bias(from_blocks(yb, self._row_take, self._rows.even))

    def to_dense(self) -> torch.Tensor:
        # A_ij = U_i diag(s_ij) V_j^T, (b, b, hmax, cmax)
        blocks = (self.left[:, None] * self.coupling[:, :, None, :]) @ \
            self.right.transpose(-1, -2)[None]
        return blocks_to_dense(blocks, self._row_gather[:, None, :, None],
                               self._col_gather[None, :, None, :], self.out_features,
                               self.in_features)

    def flops(self) -> int:
        return blast_flops(self.in_features, self.out_features, self.num_blocks, self.rank)

    def num_params(self) -> int:
        padding = self.rank * (self._rows.padding + self._cols.padding)
        return super().num_params() - padding

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "num_blocks": self.num_blocks, "rank": self.rank}

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, num_blocks: Optional[int] = None, rank: Optional[int] = None,
                   num_iters: int = 30, seed: int = 0) -> "BlastLinear":
        """Fit a BLAST layer to ``weight`` by alternating least squares.

        ``num_blocks`` defaults to 4 (less when min(in, out) < 4, and 2 then 1 when the budget
        cannot pay for rank 1 at b = 4); ``rank`` defaults to the largest r with
        r (in + out) + r b^2 within ``budget``.  Init: U_i the top-r left singular vectors of
        block row i, V_j the top-r right singular vectors of block column j (random directions
        beyond a block's size), s the least-squares couplings; then ``num_iters`` rounds of exact
        least-squares updates of V, U and s in turn (each a batched solve of r x r systems; the
        heavy part is three (out x in x r) contractions per round), keeping the best iterate and
        stopping early once a round improves the error by less than 1e-4 (relative).
        """
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        most = min(in_features, out_features)
        num_iters = check_int("num_iters", num_iters, 0)

        def largest_rank(b: int) -> int:
            r = min(most, int(budget * in_features * out_features // (in_features + out_features
                                                                       + b * b)) + 1)
            while r > 0 and not fits(blast_flops(in_features, out_features, b, r), budget,
                                     in_features, out_features):
                r -= 1
            return r

        if num_blocks is not None:
            num_blocks = check_int("num_blocks", num_blocks, 1, most)
        else:
            num_blocks = next((b for b in (4, 2, 1) if b <= most and
                               (rank is not None or largest_rank(b) >= 1)), 1)
        if rank is None:
            rank = largest_rank(num_blocks)
            if rank < 1:
                raise no_fit_error("blast", budget, in_features, out_features,
                                   blast_flops(in_features, out_features, num_blocks, 1),
                                   f"layer (num_blocks={num_blocks}, rank=1)")
        else:
            rank = check_int("rank", rank, 1, most)
            cost = blast_flops(in_features, out_features, num_blocks, rank)
            if not fits(cost, budget, in_features, out_features):
                raise ValueError(f"rank={rank} with num_blocks={num_blocks} costs {cost} "
                                 f"multiply-adds, more than budget={budget} of {out_features}x"
                                 f"{in_features} allows")
        layer = cls(in_features, out_features, num_blocks=num_blocks, rank=rank,
                    bias=bias is not None)
        rows_live, cols_live = (m.to(fitted.dtype) for m in layer._live())
        blocks = dense_to_blocks(fitted, layer._row_gather[:, None, :, None],
                                 layer._col_gather[None, :, None, :])      # (b, b, hmax, cmax)
        left, right, coupling = _fit_blast(blocks, rank, rows_live, cols_live, num_iters, seed)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            layer.coupling.copy_(coupling)
        return finish_from_dense(layer, weight, bias)


def _solve_psd(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """gram^{-1} rhs for batched symmetric PSD (..., r, r) with a tiny ridge for stability."""
    r = gram.shape[-1]
    ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge[..., None, None] * eye, rhs)


def _blast_dense_blocks(left, right, coupling):
    return (left[:, None] * coupling[:, :, None, :]) @ right.transpose(-1, -2)[None]


def _fit_blast(blocks: torch.Tensor, rank: int, rows_live: torch.Tensor, cols_live: torch.Tensor,
               num_iters: int, seed: int):
    """ALS for A_ij ~ U_i diag(s_ij) V_j^T on zero-padded blocks (b, b, hmax, cmax)."""
    b, _, hmax, cmax = blocks.shape
    generator = torch.Generator().manual_seed(seed)

    def top_vectors(mat: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        # mat (b, size, other) -> (b, size, r): top-r left singular vectors, random beyond rank
        u, _, _ = truncated_svd(mat, rank)
        if u.shape[-1] < rank:
            extra = torch.randn(b, mat.shape[1], rank - u.shape[-1], generator=generator,
                                dtype=mat.dtype) / mat.shape[1] ** 0.5
            u = torch.cat([u, extra], -1)
        return u * live

    row_blocks = blocks.permute(0, 2, 1, 3).reshape(b, hmax, b * cmax)   # block row i: (hmax, in)
    col_blocks = blocks.permute(1, 3, 0, 2).reshape(b, cmax, b * hmax)   # block col j: (cmax, out)
    left = top_vectors(row_blocks, rows_live)                            # (b, hmax, r)
    right = top_vectors(col_blocks, cols_live)                           # (b, cmax, r)

    def update_coupling(left, right):
        # (U_i^T U_i ⊙ V_j^T V_j) s_ij = diag(U_i^T A_ij V_j)
        gram = (left.transpose(-1, -2) @ left)[:, None] * (right.transpose(-1, -2) @ right)[None]
        target = torch.einsum("ijhc,ihr,jcr->ijr", blocks, left, right)
        return _solve_psd(gram, target[..., None])[..., 0]                # (b, b, r)

    coupling = update_coupling(left, right)
    total = float(blocks.square().sum()) + 1e-30
    best = (float((blocks - _blast_dense_blocks(left, right, coupling)).square().sum()),
            left, right, coupling)
    previous = best[0]
    for _ in range(num_iters):
        # V_j: sum_i (s_ij s_ij^T ⊙ U_i^T U_i) V_j^T = sum_i diag(s_ij) U_i^T A_ij
        gram_u = left.transpose(-1, -2) @ left                               # (b, r, r)
        gram = torch.einsum("ijr,ijk,irk->jrk", coupling, coupling, gram_u)
        rhs = torch.einsum("ijhc,ihr,ijr->jrc", blocks, left, coupling)      # (b, r, cmax)
        right = _solve_psd(gram, rhs).transpose(-1, -2) * cols_live
        # U_i: U_i sum_j (s_ij s_ij^T ⊙ V_j^T V_j) = sum_j A_ij V_j diag(s_ij)
        gram_v = right.transpose(-1, -2) @ right
        gram = torch.einsum("ijr,ijk,jrk->irk", coupling, coupling, gram_v)
        rhs = torch.einsum("ijhc,jcr,ijr->irh", blocks, right, coupling)     # (b, r, hmax)
        left = _solve_psd(gram, rhs).transpose(-1, -2) * rows_live
        coupling = update_coupling(left, right)
        error = float((blocks - _blast_dense_blocks(left, right, coupling)).square().sum())
        if error < best[0]:
            best = (error, left, right, coupling)
        if error <= 1e-14 * total or previous - error <= 1e-4 * previous:
            break
        previous = error
    return best[1], best[2], best[3]
