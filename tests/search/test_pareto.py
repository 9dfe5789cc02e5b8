"""Pareto maths against brute force."""
import itertools
import math
import random

import pytest

from gsmsearch.search import best_within_budget, hypervolume_2d, pareto_front


def brute_front(points, directions):
    sign = [-1 if d == "maximize" else 1 for d in directions]
    mins = [[s * v for s, v in zip(sign, p)] for p in points]
    out = []
    for i, p in enumerate(mins):
        dominated = any(
            all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
            for j, q in enumerate(mins) if j != i
        )
        if not dominated:
            out.append(i)
    return out


def brute_hypervolume(points, directions, reference):
    """Union area of the boxes [p, ref] on the grid of all coordinates (exact for rectangles)."""
    sign = [-1 if d == "maximize" else 1 for d in directions]
    mins = [[s * v for s, v in zip(sign, p)] for p in points]
    ref = [s * v for s, v in zip(sign, reference)]
    xs = sorted({p[0] for p in mins} | {ref[0]})
    ys = sorted({p[1] for p in mins} | {ref[1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if x1 > ref[0] or y1 > ref[1]:
            continue
        if any(p[0] <= x0 and p[1] <= y0 for p in mins):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("directions", [("maximize", "minimize"), ("minimize", "minimize"),
                                        ("maximize", "maximize")])
def test_front_and_hypervolume_match_brute_force(seed, directions):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # coarse values so ties and duplicates occur
    points = [(round(rng.random(), 1), round(rng.random(), 1)) for _ in range(n)]
    assert pareto_front(points, directions) == brute_front(points, directions)
    reference = tuple(0.0 if d == "maximize" else 1.0 for d in directions)
    assert hypervolume_2d(points, directions, reference) == pytest.approx(
        brute_hypervolume(points, directions, reference))


def test_three_objectives_front():
    rng = random.Random(0)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(50)]
    dirs = ("maximize", "minimize", "minimize")
    assert pareto_front(points, dirs) == brute_front(points, dirs)


def test_nan_points_are_never_on_the_front():
    points = [(0.9, 0.2), (math.nan, 0.1), (0.5, 0.5)]
    assert pareto_front(points, ("maximize", "minimize")) == [0]


def test_points_beyond_the_reference_add_nothing():
    assert hypervolume_2d([(0.5, 1.2)], ("maximize", "minimize"), (0.0, 1.0)) == 0.0
    assert hypervolume_2d([(0.5, 0.5)], ("maximize", "minimize"), (0.0, 1.0)) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(10))
def test_best_within_budget_matches_brute_force(seed):
    rng = random.Random(seed)
    q = [round(rng.random(), 2) for _ in range(30)]
    c = [round(rng.random(), 2) for _ in range(30)]
    budgets = [0.1, 0.25, 0.5, 1.0]
    got = best_within_budget(q, c, budgets)
    for b in budgets:
        feasible = [i for i in range(30) if c[i] <= b]
        if not feasible:
            assert got[b] is None
        else:
            best_q = max(q[i] for i in feasible)
            assert q[got[b]] == best_q and c[got[b]] <= b
            assert c[got[b]] == min(c[i] for i in feasible if q[i] == best_q)


def test_bad_directions():
    with pytest.raises(ValueError, match="direction must be"):
        pareto_front([(1, 2)], ("up", "down"))
