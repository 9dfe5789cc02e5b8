"""A plain multi-layer perceptron whose hidden layers are built through a linear factory."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._registry import LinearFactory

__all__ = ["MLP"]


class MLP(nn.Module):
    """``in -> hidden[0] -> ... -> hidden[-1] -> num_classes`` with GELU between layers.

    The hidden layers (``layers.0``, ``layers.1``, ...) are the candidates for structure and are
    built with ``linear_factory``; the classifier ``head`` is a plain ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_classes: int,
        *,
        linear_factory: LinearFactory = nn.Linear,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden_sizes)]
        self.layers = nn.ModuleList(
            linear_factory(width_in, width_out, bias=True)
            for width_in, width_out in zip(widths[:-1], widths[1:])
        )
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        for layer in self.layers:
            x = self.drop(self.act(layer(x)))
        return self.head(x)  # (B, num_classes)
