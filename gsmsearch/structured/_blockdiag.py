"""BlockDiagonalLinear: ``num_blocks`` dense blocks on the diagonal.

Input and output are split into ``num_blocks`` contiguous blocks of balanced sizes (sizes differ by
at most one, the first ``n % num_blocks`` blocks one longer); output block i reads input block i.
Cost per token: ``sum_i h_i * c_i`` (h_i, c_i the output and input block sizes); equal to
``in * out / num_blocks`` when both sizes divide.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import (BlockLayout, block_bmm, blocks_to_dense, check_dense, check_int, dense_to_blocks,
                      finish_from_dense, fits, from_blocks, init_bias_like_linear, no_fit_error,
                      to_blocks)

__all__ = ["BlockDiagonalLinear"]


def block_diagonal_flops(in_features: int, out_features: int, num_blocks: int) -> int:
    rows = BlockLayout(out_features, num_blocks).sizes
    cols = BlockLayout(in_features, num_blocks).sizes
    return sum(h * c for h, c in zip(rows, cols))


@register_family("blockdiag")
class BlockDiagonalLinear(StructuredLinear):
    """Block-diagonal linear layer.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        num_blocks: b, in [1, min(in, out)].
        bias: learn an additive bias.

    Parameter ``weight`` (b, hmax, cmax): block i, zero-padded to the largest block sizes when
    in or out is not divisible by b.  Padded slots never touch the output (padded inputs are
    zero, padded outputs are dropped), so they get zero gradient and stay zero;
    :meth:`num_params` counts only the live entries.  Forward is one batched matmul.
    Init: live entries N(0, 1/(3 c_i)), so each row has expected squared norm 1/3 as under
    nn.Linear's default init; outputs have nn.Linear's scale.
    """

    def __init__(self, in_features: int, out_features: int, *, num_blocks: int,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.num_blocks = check_int("num_blocks", num_blocks, 1,
                                    min(self.in_features, self.out_features),
                                    context=" (min(in_features, out_features))")
        self._rows = BlockLayout(self.out_features, self.num_blocks)
        self._cols = BlockLayout(self.in_features, self.num_blocks)
        self.register_buffer("_row_gather", self._rows.gather, persistent=False)  # (b, hmax)
        self.register_buffer("_row_take", self._rows.take, persistent=False)      # (out,)
        self.register_buffer("_col_gather", self._cols.gather, persistent=False)  # (b, cmax)
        live = (self._rows.gather < self.out_features)[:, :, None] & \
            (self._cols.gather < self.in_features)[:, None, :]                     # (b, hmax, cmax)
        self.register_buffer("_live", live, persistent=False)
        self.weight = nn.Parameter(torch.empty(self.num_blocks, self._rows.max_size,
                                               self._cols.max_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        col_sizes = torch.tensor(self._cols.sizes, dtype=torch.float32)
        with torch.no_grad():
            self.weight.normal_()
            self.weight.mul_((3 * col_sizes).rsqrt()[:, None, None].to(self.weight))
            self.weight.mul_(self._live)
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = to_blocks(x, self._col_gather, self._cols.even)           # (..., b, cmax)
        yb = block_bmm(xb, self.weight.transpose(1, 2))                # (..., b, hmax)
        return self._add_bias(from_blocks(yb, self._row_take, self._rows.even))  # (..., out)

    def to_dense(self) -> torch.Tensor:
        return blocks_to_dense(self.weight, self._row_gather[:, :, None],
                               self._col_gather[:, None, :], self.out_features, self.in_features)

    def flops(self) -> int:
        return sum(h * c for h, c in zip(self._rows.sizes, self._cols.sizes))

    def num_params(self) -> int:
        padding = self.weight.numel() - int(self._live.sum())
        return super().num_params() - padding

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "num_blocks": self.num_blocks}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, num_blocks: Optional[int] = None) -> "BlockDiagonalLinear":
        """Copy the diagonal blocks of ``weight`` (the Frobenius-best block-diagonal
        approximation).  ``num_blocks`` defaults to the smallest b whose cost fits ``budget``."""
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        most = min(in_features, out_features)
        if num_blocks is None:
            num_blocks = next((b for b in range(1, most + 1)
                               if fits(block_diagonal_flops(in_features, out_features, b),
                                       budget, in_features, out_features)), None)
            if num_blocks is None:
                raise no_fit_error("blockdiag", budget, in_features, out_features,
                                   block_diagonal_flops(in_features, out_features, most),
                                   f"layer (num_blocks={most})")
        else:
            num_blocks = check_int("num_blocks", num_blocks, 1, most)
            cost = block_diagonal_flops(in_features, out_features, num_blocks)
            if not fits(cost, budget, in_features, out_features):
                raise ValueError(f"num_blocks={num_blocks} costs {cost} multiply-adds, more than "
                                 f"budget={budget} of {out_features}x{in_features} allows")
        layer = cls(in_features, out_features, num_blocks=num_blocks, bias=bias is not None)
        blocks = dense_to_blocks(fitted, layer._row_gather[:, :, None], layer._col_gather[:, None, :])
        with torch.no_grad():
            layer.weight.copy_(blocks)
        return finish_from_dense(layer, weight, bias)
