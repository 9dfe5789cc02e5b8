"""Early stopping of trials that respects the cost axis (the spec's ``pruner:`` section).

A running trial reports its validation quality after every epoch (the workload's ``quality``
metric on the validation split, never the test split).  At chosen epochs the driver compares it
with the trials of *comparable cost* that reached the same epoch, and stops it when it falls
behind them.  The rules are written here (not Optuna's pruners) because Optuna refuses
``trial.report`` / ``should_prune`` in multi-objective studies, and because a single-metric
pruner biases an accuracy-vs-cost study towards expensive models: a model at a tenth of the
FLOPs is expected to be less accurate than one at half, and must never be stopped for that.

**The cost rule.**  Trial B is comparable to trial A when both

- are of the same family and the same workload setup (workload name, options, mode, epochs), and
- have costs within ``cost_factor`` (default 1.5) of each other: max(cA, cB) / min(cA, cB)
  <= cost_factor, where a trial's cost is its ``budget`` (the fraction of the dense FLOPs its
  structured layers are held to; 1 for the ``dense`` family);
- (``hyperband``) belong to the same bracket.

A trial is judged at an epoch only against comparable trials that reported that epoch (running,
finished or stopped ones); with fewer than ``min_trials`` of them it is never stopped there.

**The rules** (quality is maximised; a trial is never stopped at its last epoch):

- ``median``: at every epoch e >= ``min_epochs``, stop the trial when its best validation
  quality so far is below the median of the comparable trials' qualities at epoch e.
- ``asha`` / ``successive-halving`` (asynchronous successive halving; the two names are the same
  rule): rungs at epochs ``min_epochs * reduction_factor**k``; a trial reaching a rung continues
  when its quality there is among the best 1/``reduction_factor`` of the comparable trials that
  reached the rung, itself included (the best one always continues), else it is stopped.
- ``hyperband``: brackets s = 0, 1, ... with first rungs ``min_epochs * reduction_factor**s``
  (up to the last epoch, the bracket that never stops a trial); each configuration is placed in
  one bracket by a hash of its digest, weighted as Hyperband does (more configurations in the
  aggressive brackets), and ASHA runs within each bracket.

The decisions are pure functions of the curves given, so they are unit-tested without Ray.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["TrialCurve", "Decision", "Pruner", "make_pruner", "comparable", "trial_cost", "workload_key",
           "asha_rungs", "hyperband_brackets", "curve_from_attrs", "PRUNER_NAMES"]

PRUNER_NAMES = ("none", "median", "asha", "successive-halving", "hyperband")
DEFAULTS = {"min_epochs": 1, "reduction_factor": 3, "min_trials": 3, "cost_factor": 1.5}


def trial_cost(config: Dict[str, Any]) -> float:
    """The cost a trial is compared by: its ``budget`` (dense: 1)."""
    if config.get("family") == "dense":
        return 1.0
    return float(config.get("budget", 1.0))


def workload_key(config: Dict[str, Any]) -> str:
    """What must be equal for two trials' curves to be on the same scale: the workload, its
    options, the training mode and the number of epochs (the seed may differ)."""
    import json

    return json.dumps([config.get("workload"), config.get("workload_options", {}), config.get("mode"),
                       config.get("epochs")], sort_keys=True, default=str)


@dataclass
class TrialCurve:
    """One trial's validation quality per epoch, with what decides whom it is compared with."""

    number: int
    family: str
    cost: float
    workload: str
    digest: str = ""
    qualities: Dict[int, float] = field(default_factory=dict)  # epoch (1-based) -> validation quality

    @classmethod
    def from_config(cls, number: int, config: Dict[str, Any], digest: str = "") -> "TrialCurve":
        return cls(number, str(config.get("family")), trial_cost(config), workload_key(config), digest)

    def best_until(self, epoch: int) -> float:
        return max(v for e, v in self.qualities.items() if e <= epoch)

    def as_list(self) -> List[List[float]]:
        return [[e, self.qualities[e]] for e in sorted(self.qualities)]


@dataclass
class Decision:
    """Why a trial is stopped: the rule, the epoch, its value, the threshold it fell below and
    the comparable trials it was compared with."""

    rule: str
    epoch: int
    value: float
    threshold: float
    comparable: List[int]
    cost_factor: float
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def comparable(a: TrialCurve, b: TrialCurve, cost_factor: float) -> bool:
    """Whether ``b`` may be compared with ``a`` (see the module docstring: same family, same
    workload setup, costs within ``cost_factor`` of each other)."""
    if a.number == b.number or a.family != b.family or a.workload != b.workload:
        return False
    low, high = sorted((a.cost, b.cost))
    if low <= 0:
        return high <= 0
    return high / low <= cost_factor * (1 + 1e-12)


def asha_rungs(min_epochs: int, reduction_factor: int, epochs: int) -> List[int]:
    """The epochs at which ASHA judges a trial: min_epochs * reduction_factor**k, below ``epochs``."""
    rungs, rung = [], int(min_epochs)
    while rung < epochs:
        rungs.append(rung)
        rung *= int(reduction_factor)
    return rungs


def hyperband_brackets(min_epochs: int, reduction_factor: int, epochs: int) -> List[int]:
    """Each bracket's first rung, most aggressive first; the last bracket (first rung at or past
    the last epoch) never stops a trial."""
    firsts, rung = [], int(min_epochs)
    while rung < epochs:
        firsts.append(rung)
        rung *= int(reduction_factor)
    return firsts + [int(epochs)]


def _bracket_weights(n: int, reduction_factor: int) -> List[int]:
    # Hyperband's number of configurations per bracket (Li et al. 2018), as Optuna's
    # HyperbandPruner shares trials among brackets: ceil(n * eta^(n-1-s) / (n - s))
    return [math.ceil(n * reduction_factor ** (n - 1 - s) / (n - s)) for s in range(n)]


class Pruner:
    """One of the rules of the module docstring, with its parameters."""

    def __init__(self, name: str, *, epochs: int, min_epochs: int = 1, reduction_factor: int = 3,
                 min_trials: int = 3, cost_factor: float = 1.5) -> None:
        if name not in PRUNER_NAMES or name == "none":
            raise ValueError(f"unknown pruner {name!r}; expected one of {', '.join(PRUNER_NAMES[1:])}")
        self.name, self.epochs = name, int(epochs)
        self.min_epochs, self.reduction_factor = int(min_epochs), int(reduction_factor)
        self.min_trials, self.cost_factor = int(min_trials), float(cost_factor)
        self.brackets = hyperband_brackets(self.min_epochs, self.reduction_factor, self.epochs)

    def bracket(self, curve: TrialCurve) -> int:
        """The Hyperband bracket of ``curve``'s configuration (0 for the other rules)."""
        if self.name != "hyperband":
            return 0
        weights = _bracket_weights(len(self.brackets), self.reduction_factor)
        draw = int(hashlib.sha256((curve.digest or str(curve.number)).encode()).hexdigest(), 16) % sum(weights)
        for index, weight in enumerate(weights):
            if draw < weight:
                return index
            draw -= weight
        return len(weights) - 1  # pragma: no cover

    def rungs(self, curve: TrialCurve) -> List[int]:
        if self.name == "median":
            return list(range(self.min_epochs, self.epochs))
        first = self.brackets[self.bracket(curve)] if self.name == "hyperband" else self.min_epochs
        return asha_rungs(first, self.reduction_factor, self.epochs)

    def peers(self, curve: TrialCurve, epoch: int, others: Iterable[TrialCurve]) -> List[TrialCurve]:
        """The trials ``curve`` is compared with at ``epoch``: comparable, with a value there,
        and (hyperband) of the same bracket."""
        bracket = self.bracket(curve)
        return [o for o in others
                if epoch in o.qualities and comparable(curve, o, self.cost_factor)
                and (self.name != "hyperband" or self.bracket(o) == bracket)]

    def decide(self, curve: TrialCurve, epoch: int, others: Iterable[TrialCurve]) -> Optional[Decision]:
        """Whether to stop ``curve``'s trial after ``epoch`` (None: it continues)."""
        if epoch not in curve.qualities or epoch >= self.epochs or epoch not in self.rungs(curve):
            return None
        peers = self.peers(curve, epoch, others)
        if len(peers) < self.min_trials:
            return None
        values = [p.qualities[epoch] for p in peers]
        numbers = sorted(p.number for p in peers)
        if self.name == "median":
            value, threshold = curve.best_until(epoch), statistics.median(values)
            if not value < threshold:
                return None
            why = (f"its best validation quality up to epoch {epoch}, {value:.4g}, is below the median "
                   f"{threshold:.4g} of {len(peers)} trial(s) of comparable cost at that epoch")
        else:
            value = curve.qualities[epoch]
            competing = sorted(values + [value], reverse=True)
            keep = max(len(competing) // self.reduction_factor, 1)
            threshold = competing[keep - 1]
            if not value < threshold:
                return None
            why = (f"its validation quality at epoch {epoch}, {value:.4g}, is not among the best {keep} of "
                   f"{len(competing)} (itself and {len(peers)} trial(s) of comparable cost that reached this "
                   f"rung; the lowest value kept is {threshold:.4g})")
        bracket = f", bracket {self.bracket(curve)}" if self.name == "hyperband" else ""
        reason = (f"{self.name}{bracket}: {why}; comparable: {curve.family}, budget within {self.cost_factor:g}x "
                  f"of {curve.cost:g}: trials {', '.join(map(str, numbers))}")
        return Decision(self.name, epoch, float(value), float(threshold), numbers, self.cost_factor, reason)


def make_pruner(spec) -> Optional[Pruner]:
    """The pruner of a :class:`~gsmsearch.search.StudySpec` (None for ``none``)."""
    section = spec.pruner
    if section.name == "none":
        return None
    values = {key: getattr(section, key) for key in DEFAULTS}
    values = {key: DEFAULTS[key] if value is None else value for key, value in values.items()}
    return Pruner(section.name, epochs=spec.workload.epochs, **values)


def curve_from_attrs(number: int, user_attrs: Dict[str, Any]) -> Optional[TrialCurve]:
    """A recorded trial's curve: its ``epoch_quality`` (reported while it ran) or, for a finished
    trial, the validation quality of each of its ``curves`` (epoch reports); None without a
    configuration or any epoch."""
    config = user_attrs.get("config")
    if not isinstance(config, dict):
        return None
    curve = TrialCurve.from_config(number, config, str(user_attrs.get("config_digest") or ""))
    for item in user_attrs.get("epoch_quality") or []:
        try:
            curve.qualities[int(item[0])] = float(item[1])
        except (TypeError, ValueError, IndexError):
            continue
    for report in user_attrs.get("curves") or []:
        try:
            curve.qualities[int(report["epoch"])] = float(report["val"]["quality"])
        except (TypeError, ValueError, KeyError):
            continue
    return curve if curve.qualities else None
