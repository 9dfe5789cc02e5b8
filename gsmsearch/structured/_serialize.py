"""Save and load a model's learned structure as one safetensors file.

The file holds the model's whole state dict (every tensor, structured factors, widths and
locations included) and, in its metadata, for each structured layer its qualified name, family and
constructor config.  :func:`load_structure` rebuilds those layers inside a freshly built model of
the same architecture (e.g. the dense model a workload builds), then loads every tensor strictly,
so the result computes the same function as the saved model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from torch import nn

from ._base import StructuredLinear, get_family
from ._surgery import set_module

__all__ = ["save_structure", "load_structure", "FORMAT_VERSION"]

FORMAT_VERSION = "1"


def save_structure(model: nn.Module, path: Union[str, Path], *, extra_metadata: dict = None) -> None:
    from safetensors.torch import save_file

    layers = {
        name: {"family": module.family, "config": module.config()}
        for name, module in model.named_modules()
        if isinstance(module, StructuredLinear)
    }
    if isinstance(model, StructuredLinear):
        layers = {"": {"family": model.family, "config": model.config()}}
    metadata = {
        "gsmsearch_format": FORMAT_VERSION,
        "layers": json.dumps(layers, sort_keys=True),
        "extra": json.dumps(extra_metadata or {}, sort_keys=True),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # a tied weight (a language model's head and token embedding) appears under two keys;
    # safetensors refuses shared memory, so each later key gets a copy (loading writes both)
    storages = set()
    for key, value in list(tensors.items()):
        storage = value.untyped_storage().data_ptr()
        if storage in storages:
            tensors[key] = value.clone()
        storages.add(storage)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


def read_metadata(path: Union[str, Path]) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("gsmsearch_format") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a gsmsearch structure file (format {metadata.get('gsmsearch_format')!r}, "
            f"expected {FORMAT_VERSION!r})"
        )
    return {
        "layers": json.loads(metadata["layers"]),
        "extra": json.loads(metadata.get("extra", "{}")),
    }


def load_structure(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Rebuild the structured layers recorded in ``path`` inside ``model`` (in place) and load all
    tensors.  ``model`` must have the saved model's architecture (its linear layers may still be
    dense).  Returns the model (or the rebuilt layer when a single layer was saved)."""
    from safetensors.torch import load_file

    layers = read_metadata(path)["layers"]
    for name, record in layers.items():
        layer = get_family(record["family"])(**record["config"])
        if name == "":
            model = layer
        else:
            set_module(model, name, layer)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
