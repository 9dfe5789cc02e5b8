"""The dashboard's computations against brute force: fronts per family, hypervolume (and its
history), the best-quality-at-budget table per family, and the coverage heatmap."""
import itertools
import random

import numpy as np
import pytest

from gsmsearch.dashboard import _data
from gsmsearch.search import TrialRecord

from .conftest import MAIN_TRIALS


def _records(rng, n, families=("gblr", "lowrank", "monarch")):
    records = []
    for number in range(n):
        state = rng.choice(["COMPLETE"] * 6 + ["FAIL", "PRUNED"])
        family = rng.choice(families)
        x, y = round(rng.uniform(0.05, 1.0), 1), round(rng.random(), 1)  # coarse: ties happen
        values = [y, x] if state == "COMPLETE" else None
        constraints = {"relative_flops": x - 0.7} if rng.random() < 0.8 else {}
        records.append(TrialRecord(number=number, state=state, family=family, values=values,
                                   params={"family": family}, user_attrs={}, constraints=constraints))
    return records


def _usable(records, family):
    return [r for r in records if r.family == family and r.state == "COMPLETE" and r.feasible]


def _brute_front(records, family):
    mine = _usable(records, family)
    front = set()
    for r in mine:
        y, x = r.values
        if not any((s.values[0] >= y and s.values[1] <= x) and (s.values[0] > y or s.values[1] < x) for s in mine):
            front.add(r.number)
    return front


def _brute_hypervolume(points, reference):
    """Union area of the boxes [x, ref_x] x [ref_y, y] on the grid of all coordinates."""
    rx, ry = reference
    inside = [(x, y) for x, y in points if x < rx and y > ry]
    xs = sorted({x for x, _ in inside} | {rx})
    ys = sorted({y for _, y in inside} | {ry})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if any(x <= x0 and y >= y1 for x, y in inside):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(15))
def test_fronts_hypervolume_and_history_per_family_match_brute_force(seed):
    rng = random.Random(seed)
    records = _records(rng, rng.randint(1, 40))
    metrics, reference = ["quality", "relative_flops"], (1.0, 0.0)
    points = _data.family_points(records, "relative_flops", "quality", metrics)
    volumes = _data.family_hypervolumes(records, "relative_flops", "quality", metrics, reference)
    history = _data.hypervolume_history(records, "relative_flops", "quality", metrics, reference)
    for family in {r.family for r in records}:
        complete = [r for r in records if r.family == family and r.state == "COMPLETE"]
        got = points.get(family, [])
        assert sorted(p.number for p in got) == sorted(r.number for r in complete)
        assert {p.number for p in got if p.status == "front"} == _brute_front(records, family)
        infeasible = {r.number for r in complete if not r.feasible}
        assert {p.number for p in got if p.status == "infeasible"} == infeasible
        usable = _usable(records, family)
        expected = _brute_hypervolume([(r.values[1], r.values[0]) for r in usable], reference)
        assert volumes.get(family, 0.0) == pytest.approx(expected)
        steps = history.get(family, [])
        assert [n for n, _ in steps] == sorted(r.number for r in usable)
        for number, volume in steps:
            upto = [(r.values[1], r.values[0]) for r in usable if r.number <= number]
            assert volume == pytest.approx(_brute_hypervolume(upto, reference))
        assert all(a[1] <= b[1] + 1e-12 for a, b in zip(steps, steps[1:]))  # never shrinks
    all_usable = [r for r in records if r.state == "COMPLETE" and r.feasible]
    assert [n for n, _ in history["all"]] == sorted(r.number for r in all_usable)


@pytest.mark.parametrize("seed", range(15))
def test_budget_table_per_family_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    records = _records(rng, rng.randint(1, 40))
    budgets = [0.1, 0.25, 0.5, 0.75, 2.0]
    table = _data.budget_table(records, "relative_flops", "quality", ["quality", "relative_flops"], budgets)
    for family in {r.family for r in records}:
        usable = _usable(records, family)
        for budget in budgets:
            fitting = [r for r in usable if r.values[1] <= budget]
            got = table.get(family, {}).get(budget)
            if not fitting:
                assert got is None
                continue
            best_y = max(r.values[0] for r in fitting)
            cheapest = min(r.values[1] for r in fitting if r.values[0] == best_y)
            first = min(r.number for r in fitting if r.values[0] == best_y and r.values[1] == cheapest)
            assert (got.number, got.y, got.x) == (first, best_y, cheapest)


def test_budget_table_on_the_seeded_trials():
    records = [TrialRecord(number=i, state="COMPLETE", family=f, values=[y, x], params={}, user_attrs={},
                           constraints={"relative_flops": x - 0.5}) for i, (f, x, y) in enumerate(MAIN_TRIALS)]
    table = _data.budget_table(records, "relative_flops", "quality", ["quality", "relative_flops"], [0.12, 0.3, 1.0])
    assert table["gblr"][0.12].number == 0
    assert table["gblr"][0.3].y == 0.90
    assert table["gblr"][1.0].y == 0.90  # the 0.95 trial is infeasible
    assert table["lowrank"][0.12] is None
    assert table["monarch"][1.0].y == 0.86
    assert table["dense"][1.0] is None  # dense breaks the constraint
    assert list(table) == ["gblr", "lowrank", "monarch", "dense"]  # GBLR first, dense last


def _brute_coverage(intervals, out_features, in_features):
    counts = np.zeros((out_features, in_features), dtype=int)
    for row_start, row_len, col_start, col_len in intervals:
        for i in range(row_len):
            for j in range(col_len):
                counts[(row_start + i) % out_features, (col_start + j) % in_features] += 1
    return counts


@pytest.mark.parametrize("seed", range(10))
def test_coverage_counts_match_brute_force_with_wrapping(seed):
    rng = random.Random(seed)
    out_features, in_features = rng.randint(1, 20), rng.randint(1, 20)
    intervals = [[rng.randrange(out_features), rng.randint(0, out_features), rng.randrange(in_features),
                  rng.randint(0, in_features)] for _ in range(rng.randint(0, 12))]
    counts, rows, cols = _data.coverage_counts(intervals, out_features, in_features, max_cells=64)
    assert counts.shape == (out_features, in_features)
    assert list(rows) == list(range(out_features + 1)) and list(cols) == list(range(in_features + 1))
    np.testing.assert_allclose(counts, _brute_coverage(intervals, out_features, in_features))


@pytest.mark.parametrize("seed", range(6))
def test_downsampled_coverage_is_the_exact_block_mean(seed):
    rng = random.Random(seed)
    out_features, in_features = rng.randint(30, 90), rng.randint(30, 90)
    intervals = [[rng.randrange(out_features), rng.randint(0, out_features), rng.randrange(in_features),
                  rng.randint(0, in_features)] for _ in range(rng.randint(1, 20))]
    max_cells = rng.randint(5, 25)
    counts, rows, cols = _data.coverage_counts(intervals, out_features, in_features, max_cells=max_cells)
    assert counts.shape == (len(rows) - 1, len(cols) - 1)
    assert counts.shape[0] <= max_cells and counts.shape[1] <= max_cells
    assert rows[0] == 0 and rows[-1] == out_features and cols[0] == 0 and cols[-1] == in_features
    full = _brute_coverage(intervals, out_features, in_features)
    for i, j in itertools.product(range(len(rows) - 1), range(len(cols) - 1)):
        block = full[rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
        assert counts[i, j] == pytest.approx(block.mean())
    # total coverage (entries x components) is kept
    sizes = np.outer(np.diff(rows), np.diff(cols))
    assert (counts * sizes).sum() == pytest.approx(sum(r * c for _, r, _, c in intervals))


def test_coverage_rejects_malformed_input():
    with pytest.raises(ValueError, match="row_start, row_len, col_start, col_len"):
        _data.coverage_counts([[0, 1, 2]], 4, 4)
    with pytest.raises(ValueError, match="layer sizes must be positive"):
        _data.coverage_counts([], 0, 4)


def test_layer_budget_shares_sum_to_one():
    from .conftest import gblr_layers

    rows = _data.layer_budget(gblr_layers(0.5))
    assert [r["layer"] for r in rows] == ["blocks.0.fc1", "blocks.0.fc2"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert rows[0]["relative"] == pytest.approx(0.5)
