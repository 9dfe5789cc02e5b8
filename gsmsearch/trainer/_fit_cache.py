"""GBLR fits of trained dense weights (``GBLRLinear.from_dense``), cached on disk.

Fine-tune trials of one study often fit the very same layers: GBLR trials that share a seed and a
budget but differ in the learning rate, distillation or epochs start from the same cached dense
model, and a pre-trained workload (MiniLM) has the same weights for every seed.  The greedy fit
is the slow part of such a trial's start (MiniLM: 1.5-3 of a 2.6-4.5 minute trial, RESULTS 6f),
so it is done once per (weights, bias, budget, fit options, code version) and read back after:
the same layer to the last bit, because the fit is deterministic for fixed inputs, seed and
thread count, and the file holds its exact tensors.

Concurrency: the dense cache's ``written_once`` -- the first process to need a fit computes it
under an exclusive file lock and writes it atomically; others wait and read it.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from ._dense_cache import code_digest, default_cache_dir, written_once

__all__ = ["cached_gblr_fit", "gblr_fit_key"]


FIT_CODE_ROOTS = ("gsmsearch.structured._gblr", "gsmsearch.structured._gblr_fit", __name__)


@functools.lru_cache(maxsize=1)
def _fit_code_version() -> str:
    """:func:`code_digest` of the fit (``GBLRLinear.from_dense`` and the layer it builds, this
    module's call of it) and of everything they import."""
    return code_digest(FIT_CODE_ROOTS)[:12]


def gblr_fit_key(weight: torch.Tensor, bias: Optional[torch.Tensor], *, budget: float, **fit_options) -> str:
    """The cache key of ``GBLRLinear.from_dense(weight, bias, budget=budget, **fit_options)``:
    the tensors' bytes, dtype and shape, the budget, the options, where it runs (device type,
    CPU thread count: reductions in another order give other bits) and the code version."""
    digest = hashlib.sha256()
    for tensor in (weight, bias):
        if tensor is None:
            digest.update(b"none")
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{data.dtype} {tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    where = {"device": weight.device.type,
             "threads": torch.get_num_threads() if weight.device.type == "cpu" else None}
    digest.update(json.dumps({"budget": float(budget), "options": fit_options, "where": where},
                             sort_keys=True, default=str).encode())
    return f"gblr-{digest.hexdigest()[:24]}-{_fit_code_version()}"


def cached_gblr_fit(weight: torch.Tensor, bias: Optional[torch.Tensor], *, budget: float,
                    cache_dir=None, **fit_options):
    """``GBLRLinear.from_dense(weight, bias, budget=budget, **fit_options)``, from the cache in
    ``cache_dir / "gblr-fits"`` when this exact fit was made before (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..structured import GBLRLinear

    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gblr-fits"
    key = gblr_fit_key(weight, bias, budget=budget, **fit_options)

    def fit():
        layer = GBLRLinear.from_dense(weight, bias, budget=budget, **fit_options)
        return layer, {"key": key, "config": json.dumps(layer.config())}

    path = written_once(folder / f"{key}.safetensors", fit)
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    layer = GBLRLinear(**config)
    layer.load_state_dict(load_file(str(path)))
    return layer.to(weight.device, weight.dtype if weight.is_floating_point() else None)
