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


# --- configurations run with several seeds ------------------------------------------------------

from gsmsearch.search import TrialRecord  # noqa: E402
from gsmsearch.search._pareto import (Spread, configuration_front, group_configurations,  # noqa: E402
                                      has_repeats, trial_seed)

_DIRECTIONS = ("maximize", "minimize")  # (quality, relative FLOPs)


def _trial(number, family, budget, seed, quality=None, flops=None, *, state="COMPLETE", constraint=None,
           user_attrs=None, with_seed_param=True):
    params = {"family": family, f"{family}.budget": budget}
    if with_seed_param:
        params["seed"] = seed
    attrs = {"config": {"family": family, "budget": budget, "seed": seed, "device": "cpu", "epochs": 2}}
    attrs.update(user_attrs or {})
    return TrialRecord(number=number, state=state, family=family,
                       values=[quality, flops] if state == "COMPLETE" else None, params=params,
                       user_attrs=attrs, constraints={} if constraint is None else {"relative_flops": constraint})


def _values(record):
    return record.values


def test_spread_is_the_sample_std_and_a_single_value_has_none():
    import statistics

    values = (0.81, 0.84, 0.80, 0.86)
    spread = Spread(values)
    assert spread.n == 4 and spread.mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert spread.std == pytest.approx(statistics.stdev(values), rel=1e-12)  # n - 1, not n
    assert spread.std != pytest.approx(statistics.pstdev(values), rel=1e-3)
    assert (spread.low, spread.high, spread.varies) == (0.80, 0.86, True)
    single = Spread((0.7,))
    assert single.std is None and single.mean == 0.7 and not single.varies  # no error bar, not a zero one
    same = Spread((0.2, 0.2, 0.2))  # FLOPs that do not depend on the seed: exactly their value
    assert same.mean == 0.2 and same.std == 0.0 and not same.varies


def test_trials_group_into_configurations_by_everything_but_the_seed():
    records = [
        _trial(0, "gblr", 0.2, 0, 0.84, 0.2), _trial(1, "gblr", 0.2, 1, 0.86, 0.2),
        _trial(2, "gblr", 0.3, 0, 0.88, 0.3),
        _trial(3, "gblr", 0.3, 1, state="FAIL", user_attrs={"final": True}),  # a failed seed
        _trial(4, "gblr", 0.3, 2, state="FAIL", user_attrs={"final": False}),  # retried: not a seed
        _trial(5, "gblr", 0.3, 2, 0.87, 0.3),  # the retry
        _trial(6, "gblr", 0.2, 2, state="RUNNING"),
        _trial(7, "gblr", 0.2, 0, state="PRUNED", user_attrs={"duplicate_of": 0}),
        _trial(8, "lowrank", 0.2, 0, 0.80, 0.2),
        # the same knobs with more epochs (a spec changed with --force): another configuration
        _trial(9, "gblr", 0.2, 0, 0.9, 0.2, user_attrs={"config": {"family": "gblr", "budget": 0.2, "seed": 0,
                                                                    "epochs": 5}}),
        # the seed recorded only in the config (a study with one seed): still grouped by it
        _trial(10, "lowrank", 0.2, 1, 0.82, 0.2, with_seed_param=False),
    ]
    groups = group_configurations(records)
    summary = [(g.family, g.params, [r.number for r in g.complete], [r.number for r in g.failed],
                [r.number for r in g.pending]) for g in groups]
    assert summary == [
        ("gblr", {"gblr.budget": 0.2}, [0, 1], [], [6]),
        ("gblr", {"gblr.budget": 0.3}, [2, 5], [3], []),
        ("lowrank", {"lowrank.budget": 0.2}, [8, 10], [], []),
        ("gblr", {"gblr.budget": 0.2}, [9], [], []),
    ]
    assert [g.number for g in groups] == [0, 2, 8, 9] and [g.seeds_tried for g in groups] == [3, 3, 2, 1]
    assert has_repeats(groups)
    # a failed configuration with a completed seed keeps n of the completed ones
    [quality, flops] = groups[1].spreads(_values)
    assert quality.values == (0.88, 0.87) and quality.n == 2 and flops.varies is False
    assert trial_seed(records[3]) == 1 and trial_seed(records[10]) == 1


def test_a_seed_that_failed_and_then_completed_is_not_a_failed_seed():
    records = [_trial(0, "gblr", 0.2, 0, state="FAIL", user_attrs={"final": True}),
               _trial(1, "gblr", 0.2, 0, 0.8, 0.2), _trial(2, "gblr", 0.2, 1, state="FAIL")]
    [group] = group_configurations(records)
    assert [r.number for r in group.complete] == [1] and [r.number for r in group.failed] == [2]


def test_trials_without_a_recorded_seed_are_configurations_of_their_own():
    """A plain Optuna study's repeats of the same parameters cannot be told from seeds: each trial
    stands alone, as it does without seeds."""
    records = [TrialRecord(number=n, state="COMPLETE", family="gblr", values=[0.8, 0.2], params={"x": 0.1},
                           user_attrs={"config": ["not a mapping"]} if n else {}, constraints={})
               for n in range(3)]
    groups = group_configurations(records)
    assert [[r.number for r in g.complete] for g in groups] == [[0], [1], [2]]
    assert not has_repeats(groups)


def test_the_front_of_the_means_is_not_the_front_of_single_trials():
    """Two configurations at the same cost: one has a lucky seed that dominates every trial of
    the other, but the other is better on average."""
    records = [_trial(0, "gblr", 0.3, 0, 0.95, 0.3), _trial(1, "gblr", 0.3, 1, 0.70, 0.3),
               _trial(2, "gblr", 0.3, 2, 0.71, 0.3),
               _trial(3, "gblr", 0.31, 0, 0.80, 0.3), _trial(4, "gblr", 0.31, 1, 0.81, 0.3),
               _trial(5, "gblr", 0.31, 2, 0.79, 0.3)]
    assert pareto_front([r.values for r in records], _DIRECTIONS) == [0]  # the lucky seed alone
    groups = group_configurations(records)
    assert configuration_front(groups, _values, _DIRECTIONS) == [1]
    assert groups[1].spreads(_values)[0].mean == pytest.approx(0.80, abs=1e-12)


def test_a_configuration_is_feasible_when_its_mean_constraints_hold():
    records = [
        # one seed feasible, mean infeasible: excluded from the front although it is the best
        _trial(0, "gblr", 0.2, 0, 0.99, 0.1, constraint=-0.1), _trial(1, "gblr", 0.2, 1, 0.99, 0.1, constraint=0.3),
        # one seed infeasible, mean feasible: on the front
        _trial(2, "gblr", 0.3, 0, 0.80, 0.2, constraint=0.1), _trial(3, "gblr", 0.3, 1, 0.80, 0.2, constraint=-0.3),
        # a constraint that is not a number never holds
        _trial(4, "gblr", 0.4, 0, 0.99, 0.05, constraint=math.nan),
        _trial(5, "gblr", 0.4, 1, 0.99, 0.05, constraint=-1.0),
    ]
    groups = group_configurations(records)
    assert [g.feasible(_values) for g in groups] == [False, True, False]
    assert groups[0].mean_constraints(_values) == {"relative_flops": pytest.approx(0.1)}
    assert configuration_front(groups, _values, _DIRECTIONS) == [1]


def test_seeds_without_finite_values_are_left_out_of_the_means():
    records = [_trial(0, "gblr", 0.2, 0, 0.8, 0.2), _trial(1, "gblr", 0.2, 1, math.nan, 0.2),
               _trial(2, "gblr", 0.2, 2, math.inf, 0.2), _trial(3, "gblr", 0.3, 0, math.nan, 0.3)]
    groups = group_configurations(records)
    [quality, _] = groups[0].spreads(_values)
    assert quality.values == (0.8,) and quality.std is None
    assert groups[1].spreads(_values) is None  # no usable seed: no mean, not on any front
    assert configuration_front(groups, _values, _DIRECTIONS) == [0]


@pytest.mark.parametrize("seed", range(10))
def test_with_one_seed_per_configuration_the_front_is_the_front_of_the_trials(seed):
    rng = random.Random(seed)
    records = [_trial(n, rng.choice(["gblr", "lowrank"]), n, 0, round(rng.random(), 1), round(rng.random(), 1),
                      constraint=rng.choice([-0.1, 0.2]))
               for n in range(rng.randint(1, 30))]
    groups = group_configurations(records)
    assert not has_repeats(groups)
    feasible = [r for r in records if r.feasible]
    expected = {feasible[i].number for i in pareto_front([r.values for r in feasible], _DIRECTIONS)}
    assert {groups[i].number for i in configuration_front(groups, _values, _DIRECTIONS)} == expected


@pytest.mark.parametrize("seed", range(10))
def test_the_front_of_the_means_matches_brute_force(seed):
    rng = random.Random(seed)
    records = []
    for number in range(rng.randint(1, 40)):
        budget, seed_value = rng.randint(0, 6), rng.randint(0, 2)
        state = rng.choice(["COMPLETE"] * 5 + ["FAIL"])
        records.append(_trial(number, "gblr", budget, seed_value, round(rng.random(), 1), budget / 10, state=state,
                              constraint=rng.choice([-0.2, 0.1])))
    groups = group_configurations(records)
    means = {}
    for group in groups:
        done = [r for r in group.complete]
        if done and sum(r.constraints["relative_flops"] for r in done) / len(done) <= 0:
            means[group.number] = (sum(r.values[0] for r in done) / len(done), done[0].values[1])
    expected = {number for number, (q, c) in means.items()
                if not any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for q2, c2 in means.values())}
    assert {groups[i].number for i in configuration_front(groups, _values, _DIRECTIONS)} == expected


def test_a_configuration_that_failed_twice_with_its_one_seed_is_not_run_with_several_seeds():
    records = [_trial(0, "gblr", 0.2, 0, state="FAIL"), _trial(1, "gblr", 0.2, 0, state="FAIL"),
               _trial(2, "gblr", 0.3, 0, 0.8, 0.3)]
    groups = group_configurations(records)
    assert [len(g.failed) for g in groups] == [2, 0] and [g.seeds_tried for g in groups] == [1, 1]
    assert not has_repeats(groups)
