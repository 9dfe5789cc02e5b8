"""Pareto maths, pure: non-dominated filtering, 2-D hypervolume, best quality at a budget.

Points are sequences of objective values with a direction per objective ("maximize" or
"minimize").  Internally everything is turned into minimisation by negating maximised values.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

__all__ = ["to_minimization", "dominates", "pareto_front", "hypervolume_2d", "best_within_budget"]


def to_minimization(point: Sequence[float], directions: Sequence[str]) -> List[float]:
    if len(point) != len(directions):
        raise ValueError(f"a point has {len(point)} values for {len(directions)} directions")
    out = []
    for value, direction in zip(point, directions):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        out.append(-float(value) if direction == "maximize" else float(value))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b (both in minimisation form): no worse everywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> List[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input
    order.  Points with a NaN are never on the front."""
    mins = [to_minimization(p, directions) for p in points]
    valid = [i for i, p in enumerate(mins) if not any(math.isnan(v) for v in p)]
    if len(directions) == 2:
        # sort by first objective, then second; sweep keeping the running best second objective
        order = sorted(valid, key=lambda i: (mins[i][0], mins[i][1]))
        front, best = set(), math.inf
        j = 0
        while j < len(order):
            # group exact ties on the first objective
            k = j
            while k < len(order) and mins[order[k]][0] == mins[order[j]][0]:
                k += 1
            group_best = mins[order[j]][1]
            if group_best < best:
                front.update(i for i in order[j:k] if mins[i][1] == group_best)
                best = group_best
            j = k
        return sorted(front)
    return [i for i in valid if not any(dominates(mins[j], mins[i]) for j in valid if j != i)]


def hypervolume_2d(
    points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]
) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (given in the objectives' own
    units and directions, e.g. reference (quality 0, relative FLOPs 1) for (max, min))."""
    if len(directions) != 2:
        raise ValueError(f"hypervolume_2d needs two objectives, got {len(directions)}")
    ref = to_minimization(reference, directions)
    mins = [to_minimization(p, directions) for p in points]
    inside = [p for p in mins if not any(math.isnan(v) for v in p) and p[0] < ref[0] and p[1] < ref[1]]
    front = sorted(inside[i] for i in pareto_front(inside, ("minimize", "minimize")))
    area, previous_y = 0.0, ref[1]
    for x, y in front:
        if y < previous_y:
            area += (ref[0] - x) * (previous_y - y)
            previous_y = y
    return area


def best_within_budget(
    qualities: Sequence[float], costs: Sequence[float], budgets: Sequence[float]
) -> Dict[float, Optional[int]]:
    """For each budget, the index of the highest-quality point with cost <= budget (None if none;
    ties: the cheaper, then the first)."""
    out: Dict[float, Optional[int]] = {}
    for budget in budgets:
        best = None
        for i, (q, c) in enumerate(zip(qualities, costs)):
            if math.isnan(q) or math.isnan(c) or c > budget:
                continue
            if best is None or q > qualities[best] or (q == qualities[best] and c < costs[best]):
                best = i
        out[budget] = best
    return out
