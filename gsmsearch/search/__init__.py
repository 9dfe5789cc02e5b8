"""The search service: study specs, storage, Ray execution and Pareto maths."""
from ._spec import METRICS, SpecError, StudySpec, load_spec, spec_from_dict
from ._pareto import best_within_budget, dominates, hypervolume_2d, pareto_front, to_minimization
from ._storage import open_storage, redact, resolve_storage_url
from ._study import TrialRecord, front_records, study_hypervolume, study_records
from ._launch import LaunchSummary, launch, study_paths

__all__ = [
    "METRICS", "SpecError", "StudySpec", "load_spec", "spec_from_dict", "best_within_budget",
    "dominates", "hypervolume_2d", "pareto_front", "to_minimization", "open_storage", "redact",
    "resolve_storage_url", "TrialRecord", "front_records", "study_hypervolume", "study_records",
    "LaunchSummary", "launch", "study_paths",
]
