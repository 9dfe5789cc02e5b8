"""gsmsearch: structure search for efficient neural networks.

The Python API (docs/python-api.md), loaded on first use so that ``gsmsearch --help`` and a Ray
worker do not import torch through this file:

- :func:`compress`: a model's linear layers replaced by a structured family at a FLOP budget;
- :func:`apply_structure`: a finished trial's learned structure applied to a model instance;
- :func:`save` / :func:`load`: a structured model in one safetensors file;
- :func:`launch`: a study from a spec file, a dict or a ``StudySpec``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    "._api": ("compress", "layer_shares", "apply_structure", "structure_file", "save", "load"),
    ".search": ("launch", "spec_from_dict", "load_spec", "SpecError", "StudySpec"),
    ".structured": ("export", "model_cost", "family_names"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from ._api import apply_structure, compress, layer_shares, load, save, structure_file
    from .search import SpecError, StudySpec, launch, load_spec, spec_from_dict
    from .structured import export, family_names, model_cost
