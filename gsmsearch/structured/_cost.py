"""Pure cost accounting for GBLR components (no nn.Module, no I/O).

A GBLR component of rank r confined to h rows and c columns computes y[I] += U (V^T x[J]) with
r (h + c) multiply-adds, or h c when it is cheaper to hold the h x c block densely; the method
counts min(r (h + c), h c).  A component with an empty interval on either side costs nothing.
"""
from __future__ import annotations

import torch

__all__ = ["interval_lengths", "component_costs", "gblr_flops"]


def interval_lengths(widths: torch.Tensor, sizes) -> torch.Tensor:
    """Integer interval lengths round(w * size), clamped to [0, size].

    widths: (2, K) fractions (row side first, then column side); sizes: (out_features, in_features).
    Returns a (2, K) int64 tensor.
    """
    size = torch.tensor([int(sizes[0]), int(sizes[1])], device=widths.device)[:, None]
    return torch.round(widths.detach() * size).long().clamp(min=torch.zeros_like(size), max=size)


def component_costs(row_lengths: torch.Tensor, col_lengths: torch.Tensor, rank: int) -> torch.Tensor:
    """Multiply-adds per token of each component: min(r (h + c), h c), 0 if h == 0 or c == 0."""
    h = row_lengths.long()
    c = col_lengths.long()
    cost = torch.minimum(rank * (h + c), h * c)
    return torch.where((h > 0) & (c > 0), cost, torch.zeros_like(cost))


def gblr_flops(widths: torch.Tensor, sizes, rank: int) -> int:
    """Total multiply-adds per token of a GBLR layer with (2, K) widths over (out, in) sizes."""
    lengths = interval_lengths(widths, sizes)
    return int(component_costs(lengths[0], lengths[1], rank).sum())
