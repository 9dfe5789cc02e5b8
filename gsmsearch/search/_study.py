"""Reading studies back: trial records, fronts and summaries (used by status/export/dashboard)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ._pareto import hypervolume_2d, pareto_front

__all__ = ["TrialRecord", "study_records", "front_records", "default_reference", "study_hypervolume",
           "OBJECTIVE_SPLIT_ATTR", "OBJECTIVE_SPLIT", "objective_split", "metric_label", "split_qualities",
           "trial_constraints"]

#: The study user attribute that says on which split a trial's ``quality`` was measured.
OBJECTIVE_SPLIT_ATTR = "objective_split"
#: What the driver records there: ``quality`` is the validation metric (the test split is only
#: recorded, as ``test_quality``).  A study without the attribute was recorded by an older
#: gsmsearch whose ``quality`` was the test metric (its ``val_quality`` the validation one).
OBJECTIVE_SPLIT = "val"


def objective_split(study_user_attrs: Dict[str, Any]) -> str:
    """The split a study's ``quality`` values were measured on: "val", or "test" for a study
    without :data:`OBJECTIVE_SPLIT_ATTR` (recorded by an older gsmsearch)."""
    return "val" if study_user_attrs.get(OBJECTIVE_SPLIT_ATTR) == OBJECTIVE_SPLIT else "test"


def metric_label(metric: str, split: str) -> str:
    """``metric`` as shown to a reader: ``quality`` with its split ("quality (val)"), others as
    they are."""
    return f"quality ({split})" if metric == "quality" else metric


def split_qualities(record: "TrialRecord", split: str):
    """(validation quality, test quality) of a complete trial in a study whose ``quality`` is
    on ``split`` (:func:`objective_split`); either may be None where it was not recorded."""
    result = record.user_attrs.get("result")
    if not isinstance(result, dict):  # a study not written by gsmsearch may hold anything there
        return None, None
    if split == "val":
        return result.get("val_quality", result.get("quality")), result.get("test_quality")
    return result.get("val_quality"), result.get("quality")


@dataclass
class TrialRecord:
    number: int
    state: str
    family: Optional[str]
    values: Optional[List[float]]
    params: Dict[str, Any]
    user_attrs: Dict[str, Any]
    constraints: Dict[str, float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    @property
    def failure_reason(self) -> Optional[str]:
        return self.user_attrs.get("failure_reason")


def trial_constraints(system_attrs: Dict[str, Any], number=float) -> Dict[str, Any]:
    """A trial's constraint values by name, from either form Optuna stores: one system attr
    ``constraints:<name>`` per constraint (``Trial.set_constraint``), or the list under
    ``constraints`` (``constraints_func``, and what optuna-dashboard reads), named by position
    ("0", "1", ...) as Optuna names them.  A trial holding both (the driver writes both) counts
    each constraint once: the named form wins.  ``number`` converts each value."""
    named = {key.split(":", 1)[1]: number(value) for key, value in system_attrs.items()
             if key.startswith("constraints:")}
    listed = system_attrs.get("constraints")
    if named or not isinstance(listed, (list, tuple)):
        return named
    return {str(i): number(value) for i, value in enumerate(listed)}


def study_records(study) -> List[TrialRecord]:
    """The study's trials as records.  A duplicate (user attribute ``duplicate_of``: a proposal
    not trained because that trial trained its model) reads as PRUNED: the driver tells Optuna a
    duplicate of a completed trial as COMPLETE with that trial's values, so that the sampler
    learns them, and here the model counts once, under the trial that trained it."""
    records = []
    for trial in study.get_trials(deepcopy=False):
        constraints = trial_constraints(trial.system_attrs)
        family = trial.params.get("family") or trial.user_attrs.get("family")
        told_duplicate = trial.state.name == "COMPLETE" and isinstance(trial.user_attrs.get("duplicate_of"), int)
        records.append(TrialRecord(
            number=trial.number, state="PRUNED" if told_duplicate else trial.state.name, family=family,
            values=list(trial.values) if trial.values is not None else None,
            params=dict(trial.params), user_attrs=dict(trial.user_attrs), constraints=constraints,
        ))
    return records


def front_records(records: List[TrialRecord], directions: List[str]) -> List[TrialRecord]:
    """The feasible, complete, non-dominated records."""
    candidates = [r for r in records if r.state == "COMPLETE" and r.values is not None and r.feasible]
    return [candidates[i] for i in pareto_front([r.values for r in candidates], directions)]


def default_reference(metric_names: List[str], directions: List[str], records) -> List[float]:
    """A reference point for hypervolume: quality 0, relative costs 1 (dense), else the worst
    observed value."""
    reference = []
    for index, (metric, direction) in enumerate(zip(metric_names, directions)):
        if metric == "quality" and direction == "maximize":
            reference.append(0.0)
        elif metric.startswith("relative") or metric == "structured_relative_flops":
            reference.append(1.0)
        else:
            observed = [r.values[index] for r in records if r.values is not None]
            worst = (max if direction == "minimize" else min)(observed) if observed else 0.0
            reference.append(worst * 1.1 if direction == "minimize" else worst * 0.9)
    return reference


def study_hypervolume(records, metric_names, directions, reference=None) -> float:
    if len(directions) != 2:
        return math.nan
    front = front_records(records, directions)
    reference = reference or default_reference(metric_names, directions, records)
    return hypervolume_2d([r.values for r in front], directions, reference)
