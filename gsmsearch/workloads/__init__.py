"""Workloads: named tasks (data splits, a model built through a linear factory, loss, metric).

>>> from gsmsearch.workloads import get_workload
>>> workload = get_workload("digits-mlp", hidden_sizes=[256, 256])
>>> splits = workload.load_data(seed=0)
>>> model = workload.build_model(linear_factory=torch.nn.Linear)
>>> workload.evaluate(model, splits.val)["quality"]

A trial's ``quality`` (what a study selects on) is this metric on the validation split; the test
split is measured once per trial and only recorded.  Importing this package registers every
built-in workload.
"""
from ._registry import (
    DataSplits,
    LinearFactory,
    Workload,
    MissingFiles,
    get_workload,
    move_to_device,
    register_workload,
    workload_names,
)

# Registration side effects: one module per task family.
from . import _animal, _digits, _imagenet, _minilm, _wikitext  # noqa: E402,F401  isort: skip

__all__ = [
    "MissingFiles",
    "DataSplits",
    "LinearFactory",
    "Workload",
    "get_workload",
    "move_to_device",
    "register_workload",
    "workload_names",
]
