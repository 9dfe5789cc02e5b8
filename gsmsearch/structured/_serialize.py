"""Save and load a model's learned structure as one safetensors file.

The file holds the model's whole state dict (every tensor, structured factors, widths and
locations included) and, in its metadata, for each structured layer its qualified name, family and
constructor config.  :func:`load_structure` rebuilds those layers inside a freshly built model of
the same architecture (e.g. the dense model a workload builds), then loads every tensor strictly,
so the result computes the same function as the saved model.

``save_structure(..., dtype=torch.bfloat16)`` stores the floating-point tensors in that dtype,
except the structural parameters (GBLR widths and locations), which stay as they are (float32):
their values are fractions of a layer's size on its index grid, and a bfloat16 fraction (8
significant bits) would move an interval of a layer wider than 256.  :func:`load_structure`
gives each tensor the dtype it has in the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ._base import StructuredLinear, get_family
from ._common import untied
from ._surgery import set_module

__all__ = ["save_structure", "load_structure", "FORMAT_VERSION"]

FORMAT_VERSION = "1"


def save_structure(model: nn.Module, path: Union[str, Path], *, extra_metadata: dict = None,
                   dtype: Optional[torch.dtype] = None) -> None:
    from safetensors.torch import save_file

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")

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
    if dtype is not None:
        kept = _structural_keys(model)
        tensors = {k: v.to(dtype) if v.is_floating_point() and k not in kept else v for k, v in tensors.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(untied(tensors), str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a reader never sees a half-written file


def _structural_keys(model: nn.Module) -> set:
    """State-dict keys of the structural parameters (widths, locations) of ``model``'s layers."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, StructuredLinear):
            ids = {id(p) for p in module.structural_parameters()}
            prefix = f"{name}." if name else ""
            keys.update(prefix + key for key, p in module.named_parameters() if id(p) in ids)
    return keys


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
    state = load_file(str(path))
    _take_dtypes(model, state)
    model.load_state_dict(state, strict=True)
    return model


def _take_dtypes(model: nn.Module, state: dict) -> None:
    """Give each floating-point parameter and buffer of ``model`` the dtype of its tensor in
    ``state`` (a bf16 file loads as a bf16 model; load_state_dict alone would cast to float32)."""
    for key, value in state.items():
        owner_name, _, attribute = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue  # load_state_dict names it
        tensor = getattr(owner, attribute, None)
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and value.is_floating_point()
                and tensor.dtype != value.dtype):
            tensor.data = tensor.data.to(value.dtype)
