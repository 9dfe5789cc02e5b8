"""The trial trainer: one model, one structure configuration, trained and measured.

>>> from gsmsearch.trainer import TrialConfig, run_trial
>>> result = run_trial(TrialConfig(workload="digits-mlp", family="gblr", budget=0.25, epochs=5))
>>> result.quality, result.relative_flops
"""
from ._config import BUDGET_CONTROLS, MODES, TrialConfig
from ._loop import EpochReport, TrainingLoop, TrialFailed, seed_everything
from ._trial import TrialResult, build_trial_model, dense_state, layer_budgets, measure_latency, run_trial

__all__ = [
    "BUDGET_CONTROLS", "MODES", "TrialConfig", "EpochReport", "TrainingLoop", "TrialFailed",
    "seed_everything", "TrialResult", "build_trial_model", "dense_state", "layer_budgets", "measure_latency",
    "run_trial",
]
