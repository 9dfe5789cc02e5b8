"""Sharing one FLOP budget among many layers (``budget_allocation: global``).

A uniform allocation gives every layer the same fraction of its dense FLOPs.  That is wasteful
when layers differ: a layer whose weight is nearly low-rank loses little at a small budget, a
cheap layer (few rows per sample) costs little to keep nearly whole.  ``allocate_budgets`` spends
the model's budget where it buys the most approximation, with the truncated-SVD error as the
proxy for what a layer loses at a given cost:

- layer l (out m x in n, t rows per sample) offers rank-1 steps i = 1, 2, ... of cost
  t (m + n) multiply-adds per sample each, removing the share s_i^2 / sum_j s_j^2 of its weight's
  energy (s = singular values), as long as they fit in its dense cost t m n; its last step is
  "stay dense": the rest of the dense cost, removing the rest of the error (share 1 = exact);
- every layer first gets ``min_components`` steps; the remaining budget goes to the steps with the
  largest energy removed per multiply-add, across all layers, each layer's in order (the optimum
  of "minimise the sum of the layers' relative errors" where each layer's gains shrink step by
  step); the last step that does not fit whole is taken in part, so the budget is met exactly.

Equal layers therefore get equal budgets (the uniform allocation); the per-sample total never
exceeds ``budget`` times the layers' dense per-sample FLOPs.  Any family can be fitted at these
budgets; the proxy is exact for low-rank and a guide for the others.  A layer whose share is 1
is best kept dense (the trainer does so).
"""
from __future__ import annotations

import heapq
import math
from typing import Dict, Mapping, Optional

import torch

__all__ = ["allocate_budgets", "ALLOCATIONS"]

ALLOCATIONS = ("uniform", "global")


def _energy_shares(weight: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))
    energy = s.square()
    total = float(energy.sum())
    return energy / total if total > 0 else torch.zeros_like(energy)


def allocate_budgets(
    weights: Mapping[str, torch.Tensor],
    budget: float,
    *,
    tokens: Optional[Mapping[str, float]] = None,
    min_components: int = 1,
    min_fractions: Optional[Mapping[str, float]] = None,
) -> Dict[str, float]:
    """Per-layer budgets (fractions of each layer's dense FLOPs, in (0, 1]) whose token-weighted
    sum is at most ``budget`` of the layers' dense per-sample FLOPs; see the module docstring.

    Args:
        weights: layer name -> dense weight (out x in).
        budget: the whole set's target, in (0, 1].
        tokens: layer name -> rows processed per sample (default 1 for every layer).
        min_components: rank-1 steps every layer gets before the competition (>= 1: every layer
            stays alive).
        min_fractions: layer name -> the least fraction of its dense cost it may get (a family's
            cheapest configuration, e.g. Monarch's); a layer starts there when that is above its
            ``min_components`` steps.
    Where the budget cannot afford every layer's minimum, the allocation is uniform (every layer
    at ``budget``).
    """
    if not weights:
        return {}
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if int(min_components) < 1:
        raise ValueError(f"min_components must be >= 1, got {min_components}")
    tokens = dict(tokens or {})
    names = list(weights)
    shape = {name: tuple(weights[name].shape) for name in names}
    rows = {name: float(tokens.get(name, 1.0)) for name in names}
    for name in names:
        if len(shape[name]) != 2 or min(shape[name]) < 1:
            raise ValueError(f"weight of {name!r} must be a non-empty matrix, got shape {shape[name]}")
        if not rows[name] > 0:
            raise ValueError(f"tokens of {name!r} must be positive, got {rows[name]}")
    dense = {name: rows[name] * shape[name][0] * shape[name][1] for name in names}
    step = {name: rows[name] * (shape[name][0] + shape[name][1]) for name in names}
    # the most rank-1 steps a layer may take without exceeding its dense cost (>= 1)
    max_steps = {name: max(1, int(dense[name] // step[name])) for name in names}
    total = budget * sum(dense.values())

    least = {name: min(1.0, max(0.0, float((min_fractions or {}).get(name, 0.0)))) for name in names}
    floor = min(int(min_components), min(max_steps.values()))
    # each layer's starting spend: its min_components steps or its family's minimum, if larger
    start = {name: max(floor * step[name], least[name] * dense[name]) for name in names}
    if sum(start.values()) > total * (1 + 1e-9):
        return {name: budget for name in names}
    # the steps a start covers (a partial step counts as taken: the next is the next direction)
    steps = {name: min(max_steps[name], math.ceil(start[name] / step[name] - 1e-9)) for name in names}
    spent = sum(start.values())

    shares = {name: _energy_shares(weights[name]) for name in names}

    def next_step(name):
        k = steps[name]
        if k < max_steps[name] and k < len(shares[name]):
            return float(shares[name][k]), step[name]
        if k == max_steps[name]:  # the last step, stay dense: the rest of the cost and error
            cost = dense[name] - spend[name]
            rest = float(shares[name][k:].sum())
            return (rest, cost) if cost > 0 else None
        return None

    # Water-filling: take the steps with the most energy removed per multiply-add first, each
    # layer's in its own order; the first step group that does not fit whole is taken in part
    # (tied steps share what is left in proportion to their cost) and the filling stops.  Equal
    # layers thus get equal budgets, and the total is met exactly.
    spend = dict(start)
    heap = []

    def push(order, name):
        nxt = next_step(name)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0] / nxt[1], order, name, nxt[1]))

    for order, name in enumerate(names):
        push(order, name)
    while heap and spent < total:
        top = heap[0][0]
        group = []
        while heap and heap[0][0] <= top + 1e-9 * abs(top):
            group.append(heapq.heappop(heap))
        cost = sum(entry[3] for entry in group)
        if spent + cost > total:
            part = (total - spent) / cost
            for _, _, name, step_cost in group:
                spend[name] += part * step_cost
            spent = total
            break
        spent += cost
        for _, order, name, step_cost in group:
            spend[name] += step_cost
            steps[name] += 1
            push(order, name)
    return {name: min(1.0, spend[name] / dense[name]) for name in names}
