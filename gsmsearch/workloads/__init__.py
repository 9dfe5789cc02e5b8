"""Workloads: named tasks (data splits, a model, loss, metric).

>>> from gsmsearch.workloads import get_workload
>>> workload = get_workload("digits-mlp", hidden_sizes=[256, 256])
>>> splits = workload.load_data(seed=0)
>>> model = workload.build_model()
>>> workload.evaluate(model, splits.val)["quality"]

A name may also reference a user's own :class:`Workload` subclass: ``module.path:ClassName``,
``path/to/file.py:ClassName`` or a name an installed package registers under the entry-point
group ``gsmsearch.workloads`` (docs/workloads.md).

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
from ._plugins import (
    ENTRY_POINT_GROUP,
    WorkloadCodeError,
    WorkloadReferenceError,
    entry_point_names,
    resolve_workload,
)

# Registration side effects: one module per task family.
from . import _animal, _digits, _hf, _imagenet, _minilm, _wikitext  # noqa: E402,F401  isort: skip

__all__ = [
    "ENTRY_POINT_GROUP",
    "WorkloadCodeError",
    "WorkloadReferenceError",
    "entry_point_names",
    "resolve_workload",
    "MissingFiles",
    "DataSplits",
    "LinearFactory",
    "Workload",
    "get_workload",
    "move_to_device",
    "register_workload",
    "workload_names",
]
