"""LowRankLinear: W = U V^T, a rank-``rank`` factorisation of the (out x in) weight.

Cost per token: ``rank * (in + out)`` multiply-adds (x -> V^T x -> U (V^T x)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import check_dense, check_int, finish_from_dense, fits, init_bias_like_linear, \
    no_fit_error, sqrt_split, truncated_svd

__all__ = ["LowRankLinear"]


@register_family("lowrank")
class LowRankLinear(StructuredLinear):
    """Low-rank linear layer, ``y = U (V^T x) + b``.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        rank: inner dimension r, in [1, min(in, out)].
        bias: learn an additive bias.

    Parameters: ``left`` U (out, r), ``right`` V (in, r).
    Init: V ~ N(0, 1/in), U ~ N(0, 1/(3 r)), so each row of U V^T has expected squared norm 1/3,
    as under nn.Linear's default U(-1/sqrt(in), 1/sqrt(in)); outputs have nn.Linear's scale.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.rank = check_int("rank", rank, 1, min(self.in_features, self.out_features),
                              context=" (min(in_features, out_features))")
        self.left = nn.Parameter(torch.empty(self.out_features, self.rank))   # U: (out, r)
        self.right = nn.Parameter(torch.empty(self.in_features, self.rank))   # V: (in, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.right, std=self.in_features ** -0.5)
        nn.init.normal_(self.left, std=(3 * self.rank) ** -0.5)
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias((x @ self.right) @ self.left.T)  # (..., in) -> (..., r) -> (..., out)

    def to_dense(self) -> torch.Tensor:
        return self.left @ self.right.T

    def flops(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "rank": self.rank}

    @staticmethod
    def max_rank(budget: float, in_features: int, out_features: int) -> int:
        """The largest rank whose cost fits ``budget`` (0 when even rank 1 does not fit)."""
        rank = min(in_features, out_features)
        while rank > 0 and not fits(rank * (in_features + out_features), budget,
                                    in_features, out_features):
            rank -= 1
        return rank

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, rank: Optional[int] = None) -> "LowRankLinear":
        """Truncated SVD of ``weight`` (the best rank-r approximation), r = ``rank`` or else the
        largest rank that fits ``budget``; factors split as U sqrt(S), V sqrt(S).  Exact SVD for
        min(in, out) <= 512, randomized (svd_lowrank) above when r < min(in, out) / 2."""
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        if rank is None:
            rank = cls.max_rank(budget, in_features, out_features)
            if rank < 1:
                raise no_fit_error("lowrank", budget, in_features, out_features,
                                   in_features + out_features, "layer (rank 1)")
        else:
            rank = check_int("rank", rank, 1, min(in_features, out_features))
            if not fits(rank * (in_features + out_features), budget, in_features, out_features):
                raise ValueError(f"rank={rank} costs {rank * (in_features + out_features)} "
                                 f"multiply-adds, more than budget={budget} of {out_features}x"
                                 f"{in_features} allows")
        left, right = sqrt_split(*truncated_svd(fitted, rank), rank)
        layer = cls(in_features, out_features, rank=rank, bias=bias is not None)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
        return finish_from_dense(layer, weight, bias)
