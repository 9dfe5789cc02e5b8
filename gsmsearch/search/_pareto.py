"""Pareto maths, pure: non-dominated filtering, 2-D hypervolume, best quality at a budget, and
trials grouped into configurations run with several seeds (mean, spread, front of the means).

Points are sequences of objective values with a direction per objective ("maximize" or
"minimize").  Internally everything is turned into minimisation by negating maximised values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["to_minimization", "dominates", "pareto_front", "hypervolume_2d", "best_within_budget", "trial_seed",
           "configuration_key", "Spread", "Configuration", "group_configurations", "has_repeats",
           "configuration_front"]


def to_minimization(point: Sequence[float], directions: Sequence[str]) -> List[float]:
    if len(point) != len(directions):
        raise ValueError(f"a point has {len(point)} values for {len(directions)} directions")
    out = []
    for value, direction in zip(point, directions):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        out.append(-float(value) if direction == "maximize" else float(value))
    return out


def _minimized(points: Sequence[Sequence[float]], directions: Sequence[str]) -> List[List[float]]:
    """``[to_minimization(p, directions) for p in points]``, the directions checked once (a study
    of 100,000 trials has its fronts computed several times per command)."""
    signs = to_minimization([1.0] * len(directions), directions)
    out = []
    for point in points:
        if len(point) != len(signs):
            to_minimization(point, directions)  # raises, saying why
        out.append([sign * float(value) for sign, value in zip(signs, point)])
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b (both in minimisation form): no worse everywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> List[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input
    order.  Points with a NaN are never on the front."""
    mins = _minimized(points, directions)
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


# --- configurations run with several seeds -------------------------------------------------------
#
# A configuration is a family and its knob values other than the seed; a study that lists several
# seeds trains each configuration once per seed.  Records here are duck-typed like
# ``TrialRecord``: ``number``, ``state``, ``family``, ``params``, ``user_attrs``, ``constraints``.

#: trial-config keys that do not make two trials different configurations
_NOT_CONFIGURATION = ("seed", "device")


def _attr(record, name: str, default=None) -> Any:
    return record.user_attrs.get(name, default) if isinstance(record.user_attrs, dict) else default


def trial_seed(record) -> Any:
    """The seed a trial ran with: its ``seed`` parameter (a study listing several seeds samples
    it), else the ``seed`` of its recorded config; None when neither is recorded."""
    if "seed" in record.params:
        return record.params["seed"]
    config = _attr(record, "config")
    if isinstance(config, dict):
        return config.get("seed")
    return None


def configuration_key(record) -> Tuple:
    """What makes two trials the same configuration: family, parameters other than the seed and
    the recorded config other than seed and device.  A trial with no recorded seed cannot be told
    apart from a repeat, so it is a configuration of its own."""
    if trial_seed(record) is None:
        return ("trial", record.number)
    params = sorted((str(k), repr(v)) for k, v in record.params.items() if k != "seed")
    config = _attr(record, "config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _NOT_CONFIGURATION}
    return (str(record.family), tuple(params), json.dumps(config, sort_keys=True, default=repr))


@dataclass(frozen=True)
class Spread:
    """One metric of one configuration over its completed seeds."""

    values: Tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        # as an offset from the first value: equal values have exactly that value as their mean
        first = self.values[0]
        return first + math.fsum(v - first for v in self.values) / len(self.values)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n - 1 in the denominator); None for a single value (no
        spread is known, which is not a spread of zero)."""
        if len(self.values) < 2:
            return None
        mean = self.mean
        return math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def varies(self) -> bool:
        return self.high > self.low


@dataclass
class Configuration:
    """The trials of one configuration, one per seed: ``complete`` (by trial number), ``failed``
    (a final failure of a seed that has no completed trial) and ``pending`` (running or waiting).
    A retried failure (``final`` False) and a pruned duplicate proposal are not seeds of it."""

    family: Optional[str]
    params: Dict[str, Any]
    complete: List[Any] = field(default_factory=list)
    failed: List[Any] = field(default_factory=list)
    pending: List[Any] = field(default_factory=list)

    @property
    def seeds_tried(self) -> int:
        """How many different seeds were tried (completed, failed or pending): a configuration
        that failed twice with the same seed was still tried with one."""
        return len({repr(trial_seed(r)) for r in self.complete + self.failed + self.pending})

    @property
    def number(self) -> int:
        """The configuration's first completed trial (else its first trial): the one that stands
        for it where a single trial is needed (a click, a link)."""
        return (self.complete or sorted(self.failed + self.pending, key=lambda r: r.number))[0].number

    def usable(self, value: Callable[[Any], Optional[Sequence[float]]]) -> List[Tuple[Any, List[float]]]:
        """(trial, values) of the completed seeds whose ``value(trial)`` is a sequence of finite
        numbers (None, or any NaN or infinity, leaves the seed out of the means)."""
        out = []
        for record in self.complete:
            values = value(record)
            if values is not None and all(v is not None and math.isfinite(v) for v in values):
                out.append((record, [float(v) for v in values]))
        return out

    def spreads(self, value: Callable[[Any], Optional[Sequence[float]]]) -> Optional[List[Spread]]:
        """Per value of ``value(trial)``, its spread over the usable seeds; None when none is."""
        usable = self.usable(value)
        if not usable:
            return None
        return [Spread(tuple(values[i] for _, values in usable)) for i in range(len(usable[0][1]))]

    def mean_constraints(self, value: Callable[[Any], Optional[Sequence[float]]]) -> Dict[str, float]:
        """Each constraint's mean over the usable seeds that record it (NaN: not a number)."""
        sums: Dict[str, List[float]] = {}
        for record, _ in self.usable(value):
            for name, c in record.constraints.items():
                sums.setdefault(name, []).append(float(c))
        return {name: math.fsum(cs) / len(cs) for name, cs in sums.items()}

    def feasible(self, value: Callable[[Any], Optional[Sequence[float]]]) -> bool:
        """Feasible when every constraint's mean over the usable seeds holds (<= 0), as a trial is
        feasible when each of its constraints holds; a NaN constraint never holds."""
        return all(c <= 0 for c in self.mean_constraints(value).values())


def group_configurations(records: Iterable[Any]) -> List[Configuration]:
    """The records grouped into configurations (see :func:`configuration_key`), in the order of
    their first trial; a pruned trial (a duplicate proposal) belongs to none."""
    groups: Dict[Tuple, Configuration] = {}
    for record in sorted(records, key=lambda r: r.number):
        if record.state == "PRUNED":
            continue
        if record.state == "FAIL" and _attr(record, "final", True) is False:
            continue  # retried: the retry is the seed's trial
        key = configuration_key(record)
        if key not in groups:
            params = {k: v for k, v in record.params.items() if k not in ("family", "seed")}
            groups[key] = Configuration(family=record.family, params=params)
        group = groups[key]
        if record.state == "COMPLETE":
            group.complete.append(record)
        elif record.state == "FAIL":
            group.failed.append(record)
        else:
            group.pending.append(record)
    for group in groups.values():
        # a seed that failed and then completed (a resumed study) is complete, not failed
        done = {repr(trial_seed(r)) for r in group.complete}
        group.failed = [r for r in group.failed if repr(trial_seed(r)) not in done]
    return list(groups.values())


def has_repeats(configurations: Iterable[Configuration]) -> bool:
    """Whether any configuration was tried with more than one seed."""
    return any(c.seeds_tried > 1 for c in configurations)


def configuration_front(configurations: Sequence[Configuration], value: Callable[[Any], Optional[Sequence[float]]],
                        directions: Sequence[str]) -> List[int]:
    """Indices (into ``configurations``) of the front of the means: the feasible configurations
    (:meth:`Configuration.feasible`) with a usable seed whose mean ``value`` no other such
    configuration dominates.  ``value(trial)``: the trial's objective values, in ``directions``'
    order (e.g. ``lambda r: r.values`` with the study's directions).

    Per family: pass that family's configurations.  ``gsmsearch status`` can call it as
    ``configuration_front(group_configurations(records), lambda r: r.values, directions)``."""
    candidates, means = [], []
    for index, configuration in enumerate(configurations):
        spreads = configuration.spreads(value)
        if spreads is None or not configuration.feasible(value):
            continue
        candidates.append(index)
        means.append([s.mean for s in spreads])
    return [candidates[i] for i in pareto_front(means, directions)]
