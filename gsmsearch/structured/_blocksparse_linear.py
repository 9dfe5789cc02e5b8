"""BlockSparseLinear: a fixed block-sparse pattern plus an optional low-rank term (Pixelfly-like,
Chen et al. 2022, "Pixelated Butterfly").

The weight is a grid of ``block_size`` x ``block_size`` blocks, gr = ceil(out / block_size) rows
by gc = ceil(in / block_size) columns (in and out are zero-padded to multiples of block_size).
The pattern is the *flat butterfly* on a square grid of side g = min(gr, gc): block (u, v) is
non-zero iff d = u XOR v is 0 or a power of two below ``butterfly_size`` (so ``butterfly_size=1``
is block-diagonal, 2 adds the first butterfly level, 4 the second, ...).  A rectangular grid
stretches the square pattern: block row i uses square row i*g // gr, block column j uses square
column j*g // gc.  The low-rank term adds U V^T of rank ``lowrank_rank``.

Cost per token: ``nnz * block_size**2 + lowrank_rank * (in + out)``, nnz the number of non-zero
blocks (padded blocks counted as executed).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import check_dense, check_int, finish_from_dense, fits, init_bias_like_linear, \
    no_fit_error, top_energy, truncated_svd

__all__ = ["BlockSparseLinear", "flat_butterfly_pattern"]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def flat_butterfly_pattern(grid_rows: int, grid_cols: int, butterfly_size: int) -> torch.Tensor:
    """(grid_rows, grid_cols) bool mask of the stretched flat butterfly pattern (module docstring)."""
    g = min(grid_rows, grid_cols)
    u = torch.arange(grid_rows) * g // grid_rows
    v = torch.arange(grid_cols) * g // grid_cols
    d = u[:, None] ^ v[None, :]
    return (d < butterfly_size) & ((d & (d - 1)) == 0)


def _grid(in_features: int, out_features: int, block_size: int) -> Tuple[int, int]:
    return math.ceil(out_features / block_size), math.ceil(in_features / block_size)


def _max_butterfly_size(in_features: int, out_features: int, block_size: int) -> int:
    """Smallest power of two >= the square grid side: larger sizes add no block."""
    g = min(_grid(in_features, out_features, block_size))
    return 1 << max(0, (g - 1).bit_length())


def blocksparse_flops(in_features: int, out_features: int, block_size: int, butterfly_size: int,
                      lowrank_rank: int) -> int:
    nnz = int(flat_butterfly_pattern(*_grid(in_features, out_features, block_size),
                                     butterfly_size).sum())
    return nnz * block_size ** 2 + lowrank_rank * (in_features + out_features)


@register_family("blocksparse")
class BlockSparseLinear(StructuredLinear):
    """Block-sparse (flat butterfly) plus low-rank linear layer.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        block_size: side of a block, in [1, min(in, out)].
        butterfly_size: a power of two, at most the square grid side rounded up to a power of two.
        lowrank_rank: rank of the low-rank term, in [0, min(in, out)] (0: none).
        bias: learn an additive bias.

    Parameters: ``blocks`` (nnz, bs, bs) in row-major pattern order, ``left`` (out, r) and
    ``right`` (in, r).  Forward works on the transposed input (see :meth:`forward`): one gather,
    one batched matmul over block rows, no Python loop over blocks.
    Init: rows of W get expected squared norm 1/3 as under nn.Linear's default init (all of it
    from the sparse part when ``lowrank_rank`` is 0, half from each part otherwise).
    """

    def __init__(self, in_features: int, out_features: int, *, block_size: int,
                 butterfly_size: int, lowrank_rank: int = 0, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        most = min(self.in_features, self.out_features)
        self.block_size = check_int("block_size", block_size, 1, most,
                                    context=" (min(in_features, out_features))")
        largest = _max_butterfly_size(self.in_features, self.out_features, self.block_size)
        self.butterfly_size = check_int("butterfly_size", butterfly_size, 1, largest,
                                        context=f" (the block grid's side rounded up to a power "
                                                f"of two with block_size={self.block_size})")
        if not _is_power_of_two(self.butterfly_size):
            raise ValueError(f"butterfly_size must be a power of two, got {butterfly_size}")
        self.lowrank_rank = check_int("lowrank_rank", lowrank_rank, 0, most,
                                      context=" (min(in_features, out_features))")
        bs = self.block_size
        self.grid = _grid(self.in_features, self.out_features, bs)            # (gr, gc)
        pattern = flat_butterfly_pattern(*self.grid, self.butterfly_size)
        block_rows, block_cols = pattern.nonzero(as_tuple=True)               # (nnz,), (nnz,)
        self.register_buffer("_block_rows", block_rows, persistent=False)
        self.register_buffer("_block_cols", block_cols, persistent=False)
        # Execution layout: every block row gets the same number of slots (the most any row
        # has); a row with fewer blocks fills its spare slots with zero weight blocks that read
        # input block 0.  ``_slot_cols`` (gr * slots,) is the input block each slot reads,
        # ``_slot_of_block`` (nnz,) the slot each parameter block fills.
        counts = torch.bincount(block_rows, minlength=self.grid[0])
        slots = int(counts.max()) if len(block_rows) else 0
        first = torch.cumsum(counts, 0) - counts                              # first block of each row
        position = torch.arange(len(block_rows)) - first[block_rows]          # rank within its row
        slot_of_block = block_rows * slots + position
        slot_cols = torch.zeros(self.grid[0] * slots, dtype=torch.long)
        slot_cols[slot_of_block] = block_cols
        self.slots_per_row = slots
        self.register_buffer("_slot_cols", slot_cols, persistent=False)
        self.register_buffer("_slot_of_block", slot_of_block, persistent=False)
        self.blocks = nn.Parameter(torch.empty(len(block_rows), bs, bs))      # (nnz, bs, bs)
        self.left = nn.Parameter(torch.empty(self.out_features, self.lowrank_rank))  # U
        self.right = nn.Parameter(torch.empty(self.in_features, self.lowrank_rank))  # V
        self.reset_parameters()

    @property
    def num_nonzero_blocks(self) -> int:
        return self.blocks.shape[0]

    def reset_parameters(self) -> None:
        gr, _ = self.grid
        share = 0.5 if self.lowrank_rank else 1.0
        fan_in = self.num_nonzero_blocks / gr * self.block_size   # mean live inputs per row
        nn.init.normal_(self.blocks, std=(share / (3 * fan_in)) ** 0.5)
        if self.lowrank_rank:
            nn.init.normal_(self.right, std=self.in_features ** -0.5)
            nn.init.normal_(self.left, std=((1 - share) / (3 * self.lowrank_rank)) ** 0.5)
        init_bias_like_linear(self.bias, self.in_features)

    #: tokens per chunk on CPU: each chunk's gathered input (slots x in x chunk) stays in cache
    #: for the batched matmul that reads it (1024 x 1024, 32-blocks, 4096 tokens: 42 ms at 128,
    #: 47 at 256, 54 at 512, 72-75 in one pass; bench/RESULTS.md "Hand-crafted baselines"); one chunk on
    #: other devices
    cpu_token_chunk = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed transposed, Y^T = W X^T, so that the gather of input blocks copies
        contiguous (block, tokens) slabs and each block row is one GEMM of shape
        (bs x slots*bs) @ (slots*bs x T): per chunk of tokens one transpose copy of x, one
        ``index_select``, one ``bmm`` (no Python loop over blocks) and the low-rank term as an
        ``addmm``."""
        gr, gc = self.grid
        bs, slots = self.block_size, self.slots_per_row
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        tokens = flat.shape[0]
        if self.blocks.shape[0] == gr * slots:
            weight = self.blocks                                         # row-major, no spare slot
        else:
            weight = self.blocks.new_zeros(gr * slots, bs, bs).index_copy(0, self._slot_of_block, self.blocks)
        weight = weight.view(gr, slots, bs, bs).transpose(1, 2).reshape(gr, bs, slots * bs)
        chunk = self.cpu_token_chunk if x.device.type == "cpu" else max(tokens, 1)
        parts = []
        for start in range(0, max(tokens, 1), chunk):
            part = flat[start:start + chunk]
            x_t = part.t()                                               # (in, c)
            if gc * bs != self.in_features:
                x_t = F.pad(x_t, (0, 0, 0, gc * bs - self.in_features))  # (gc*bs, c), a copy
            else:
                x_t = x_t.contiguous()
            width = x_t.shape[1]
            gathered = x_t.view(gc, bs, width).index_select(0, self._slot_cols)  # (gr*slots, bs, c)
            gathered = gathered.view(gr, slots * bs, width)
            y_t = torch.bmm(weight, gathered).view(gr * bs, width)[: self.out_features]  # (out, c)
            if self.lowrank_rank:
                y_t = torch.addmm(y_t, self.left, self.right.T @ part.t())
            parts.append(y_t.t())
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._add_bias(y.reshape(*lead, self.out_features))

    def sparse_dense(self) -> torch.Tensor:
        """The block-sparse part alone as a dense (out, in) matrix."""
        gr, gc = self.grid
        bs = self.block_size
        grid = self.blocks.new_zeros(gr, gc, bs, bs)
        grid = grid.index_put((self._block_rows, self._block_cols), self.blocks)
        dense = grid.permute(0, 2, 1, 3).reshape(gr * bs, gc * bs)   # (gr*bs, gc*bs)
        return dense[: self.out_features, : self.in_features]

    def to_dense(self) -> torch.Tensor:
        return self.sparse_dense() + self.left @ self.right.T

    def flops(self) -> int:
        return (self.num_nonzero_blocks * self.block_size ** 2
                + self.lowrank_rank * (self.in_features + self.out_features))

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "block_size": self.block_size,
                "butterfly_size": self.butterfly_size, "lowrank_rank": self.lowrank_rank,
                "nonzero_blocks": self.num_nonzero_blocks}

    # -- fitting -----------------------------------------------------------------------------
    @staticmethod
    def _mask(in_features: int, out_features: int, block_size: int, butterfly_size: int
              ) -> torch.Tensor:
        """(out, in) 0/1 float mask of the pattern's entries."""
        pattern = flat_butterfly_pattern(*_grid(in_features, out_features, block_size),
                                         butterfly_size)
        full = pattern.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
        return full[:out_features, :in_features].float()

    @classmethod
    def _candidates(cls, in_features: int, out_features: int, budget: float,
                    block_size: Optional[int], butterfly_size: Optional[int],
                    lowrank_rank: Optional[int]) -> List[Tuple[int, int, int]]:
        """(block_size, butterfly_size, rank) triples that fit ``budget`` (see from_dense)."""
        most = min(in_features, out_features)
        if block_size is not None:
            sizes = [check_int("block_size", block_size, 1, most)]
        else:
            sizes = [bs for bs in (32, 16, 8, 4, 2, 1) if bs <= most]
        found = []
        for bs in sizes:
            largest = _max_butterfly_size(in_features, out_features, bs)
            if butterfly_size is not None:
                size = check_int("butterfly_size", butterfly_size, 1)
                if not _is_power_of_two(size):
                    raise ValueError(f"butterfly_size must be a power of two, got {size}")
                if size > largest:
                    if block_size is not None:
                        raise ValueError(f"butterfly_size must be in [1, {largest}] with "
                                         f"block_size={bs}, got {size}")
                    continue
                butterflies = [size]
            else:
                butterflies = [1 << e for e in range(largest.bit_length())]
            for bf in butterflies:
                sparse = blocksparse_flops(in_features, out_features, bs, bf, 0)
                if lowrank_rank is not None:
                    rank = check_int("lowrank_rank", lowrank_rank, 0, most)
                else:
                    left = budget * in_features * out_features - sparse
                    rank = min(most, max(0, int(left // (in_features + out_features)) + 1))
                cost = sparse + rank * (in_features + out_features)
                while rank > 0 and lowrank_rank is None and not fits(
                        cost, budget, in_features, out_features):
                    rank -= 1
                    cost = sparse + rank * (in_features + out_features)
                if fits(cost, budget, in_features, out_features):
                    found.append((bs, bf, rank))
            if found and bs <= 8:
                break  # small blocks only as a fallback when the larger ones do not fit
        return found

    @staticmethod
    def _fit_lowrank(weight: torch.Tensor, mask: torch.Tensor, rank: int, num_iters: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rank-``rank`` L minimising ||(1 - mask) * (weight - L)|| (the pattern blocks then take
        mask * (weight - L)), by alternating projections (hard impute): L <- SVD_r(W - S),
        S = mask * (W - L).  The first step is a truncated SVD of the off-pattern part; later ones
        are a single subspace-iteration step warm-started at the previous right singular vectors
        (two (out x in x r) matmuls, a QR and an (r x in) SVD), stopping early once the
        off-pattern error improves by less than 1e-4 (relative) in a step.  Returns U sqrt(S) (out, r) and V sqrt(S) (in, r)."""
        if rank == 0:
            return weight.new_zeros(weight.shape[0], 0), weight.new_zeros(weight.shape[1], 0)
        off = weight * (1 - mask)                                         # (out, in)
        u, s, vh = truncated_svd(off, rank)
        previous = float("inf")
        scale = float(off.square().sum()) + 1e-30
        for _ in range(num_iters):
            low = (u * s) @ vh
            error = float(((off - low) * (1 - mask)).square().sum())
            if error <= 1e-14 * scale or (previous < float("inf") and previous - error <= 1e-4 * previous):
                break
            previous = error
            target = off + low * mask                                     # W - S
            q, _ = torch.linalg.qr(target @ vh.T)                         # (out, r)
            ub, s, vh = torch.linalg.svd(q.T @ target, full_matrices=False)  # (r, r), (r,), (r, in)
            u = q @ ub
        root = s.clamp_min(0).sqrt()
        return u * root, vh.T * root

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, block_size: Optional[int] = None,
                   butterfly_size: Optional[int] = None, lowrank_rank: Optional[int] = None,
                   num_iters: int = 100) -> "BlockSparseLinear":
        """Fit pattern blocks plus a low-rank term to ``weight``.

        Candidates: ``block_size`` in (32, 16, 8) -- smaller ones (4, 2, 1) only when none of
        those fits -- or the given one; every power-of-two ``butterfly_size`` (or the given one);
        the rank fills what the budget leaves (or is the given ``lowrank_rank``).  Each candidate
        is scored by the error of its first step (pattern blocks copied, best rank-r
        approximation of the rest, from Gram eigenvalues); the best is then refined by up to
        ``num_iters`` alternating projections (see :meth:`_fit_lowrank`), which usually reach an
        exact fit when ``weight`` is in the family and the pattern leaves enough entries to pin
        the low-rank term down (not always: with few off-pattern entries the iteration can stall).
        """
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        num_iters = check_int("num_iters", num_iters, 0)
        candidates = cls._candidates(in_features, out_features, budget, block_size,
                                     butterfly_size, lowrank_rank)
        if not candidates:
            bs = block_size or 1
            cheapest = blocksparse_flops(in_features, out_features, bs, 1, lowrank_rank or 0)
            raise no_fit_error("blocksparse", budget, in_features, out_features, cheapest,
                               f"layer (block_size={bs}, butterfly_size=1, "
                               f"lowrank_rank={lowrank_rank or 0})")
        total = float(fitted.square().sum())
        best = None  # (error, (bs, bf, rank))
        for bs, bf, rank in candidates:
            residual = fitted * (1 - cls._mask(in_features, out_features, bs, bf).to(fitted))
            error = float(residual.square().sum() - top_energy(residual, rank))
            if best is None or error < best[0] - 1e-9 * total:
                best = (error, (bs, bf, rank))
        bs, bf, rank = best[1]
        left, right = cls._fit_lowrank(fitted, cls._mask(in_features, out_features, bs, bf).to(fitted),
                                       rank, num_iters)
        low = left @ right.T
        layer = cls(in_features, out_features, block_size=bs, butterfly_size=bf,
                    lowrank_rank=rank, bias=bias is not None)
        gr, gc = layer.grid
        sparse = F.pad(fitted - low, (0, gc * bs - in_features, 0, gr * bs - out_features))
        grid = sparse.reshape(gr, bs, gc, bs).permute(0, 2, 1, 3)         # (gr, gc, bs, bs)
        with torch.no_grad():
            layer.blocks.copy_(grid[layer._block_rows, layer._block_cols])
            layer.left.copy_(left)
            layer.right.copy_(right)
        return finish_from_dense(layer, weight, bias)
