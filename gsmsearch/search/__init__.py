"""The search service: study specs, storage, Ray execution and Pareto maths.

The names below are loaded on first use (PEP 562), so that a Ray worker, which needs only
``gsmsearch.search._runner`` (and the trainer), does not import pydantic, Optuna's storage layer
and the driver with it: about 0.2 s of every worker's start-up, paid once per worker per launch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "_spec": ("METRICS", "SpecError", "StudySpec", "load_spec", "spec_from_dict"),
    "_pareto": ("best_within_budget", "dominates", "hypervolume_2d", "pareto_front", "to_minimization"),
    "_storage": ("open_storage", "redact", "resolve_storage_url"),
    "_study": ("OBJECTIVE_SPLIT", "OBJECTIVE_SPLIT_ATTR", "TrialRecord", "front_records", "metric_label",
               "objective_split", "split_qualities", "study_hypervolume", "study_records"),
    "_launch": ("LaunchSummary", "launch", "resolve_spec", "study_paths"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from ._launch import LaunchSummary, launch, resolve_spec, study_paths
    from ._pareto import best_within_budget, dominates, hypervolume_2d, pareto_front, to_minimization
    from ._spec import METRICS, SpecError, StudySpec, load_spec, spec_from_dict
    from ._storage import open_storage, redact, resolve_storage_url
    from ._study import (OBJECTIVE_SPLIT, OBJECTIVE_SPLIT_ATTR, TrialRecord, front_records, metric_label,
                         objective_split, split_qualities, study_hypervolume, study_records)
