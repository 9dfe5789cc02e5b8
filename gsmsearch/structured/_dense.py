"""DenseLinear: the unstructured reference family (an ``nn.Linear`` with the family interface)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import check_dense, finish_from_dense, init_bias_like_linear

__all__ = ["DenseLinear"]


@register_family("dense")
class DenseLinear(StructuredLinear):
    """A full (out x in) weight; ``flops() = in * out``.  Init is nn.Linear's default
    (weight and bias U(-1/sqrt(in), 1/sqrt(in)))."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def flops(self) -> int:
        return self.in_features * self.out_features

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float) -> "DenseLinear":
        """A copy of ``weight``.  The dense layer costs the whole dense budget, so ``budget``
        must be 1; anything smaller raises ``ValueError``."""
        budget = cls._check_budget(budget)
        if budget < 1.0:
            raise ValueError(f"budget={budget} is below 1: a dense layer always costs the full "
                             "in * out multiply-adds; pick a structured family for a smaller budget")
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        layer = cls(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(fitted)
        return finish_from_dense(layer, weight, bias)
