"""export(): the inference copy of a structured layer or model, GBLR layers as execution plans."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .._base import StructuredLinear
from ._common import PlanCost
from ._layer import DEFAULT_PLAN, EXPORT_PLANS, ExportedGBLR, _check_sigma

__all__ = ["export"]


def _export_layer(module: nn.Module, plan: str, cost: Optional[PlanCost], name: str,
                  exact_masks: bool) -> nn.Module:
    from .._gblr import GBLRLinear

    if isinstance(module, GBLRLinear):
        return ExportedGBLR.from_gblr(module, plan=plan, cost=cost, exact_masks=exact_masks, name=name)
    if isinstance(module, StructuredLinear) and hasattr(module, "export"):
        return module.export()
    return module


def export(
    module_or_model: nn.Module, *, plan: Optional[str] = None, cost: Optional[PlanCost] = None,
    exact_masks: bool = False, dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Inference copy of a structured layer or of a whole model, in eval mode, with every GBLR
    layer replaced by its mask-free execution plan (``plan`` in :data:`EXPORT_PLANS`, default
    :data:`DEFAULT_PLAN`; ``cost``: the grouped plan's :class:`PlanCost`).  The input is left untouched.

    A plan runs exact 0/1 boxcar masks: what a GBLR layer computes at ``sigma=None``.  A layer at
    a finite ``sigma`` computes Gaussian-smoothed masks, a different function, so it is refused
    (``ValueError`` naming the layer and its sigma) unless ``exact_masks=True``: export the exact
    masks that layer converges to as sigma grows (the layer's own output at ``sigma=None``).
    Training ends with ``set_sigma(model, None)`` for the same reason.

    ``dtype`` (e.g. ``torch.bfloat16``): the copy's floating-point parameters and buffers in that
    dtype.  GBLR plans are built from the float32 widths and locations first (their intervals
    are exact whatever ``dtype``), then cast; the result takes inputs of ``dtype`` (or runs
    under autocast).  Each weight is the float32 one rounded once to ``dtype``.  (``plan="auto"``
    times its candidates in the model's own dtype.)"""
    from .._surgery import set_module

    plan = DEFAULT_PLAN if plan is None else plan
    if plan not in EXPORT_PLANS:
        raise ValueError(f"plan must be one of {EXPORT_PLANS}, got {plan!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    model = copy.deepcopy(module_or_model).eval()
    if isinstance(model, StructuredLinear):
        layer = _export_layer(model, plan, cost, "the GBLR layer", exact_masks).eval()
        return layer.to(dtype) if dtype is not None else layer  # a GBLR layer is a plan now
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, StructuredLinear)]
    for name, layer in targets:
        _check_sigma(layer, f"GBLR layer {name!r}", exact_masks)  # every layer before any work
    for name, layer in targets:
        set_module(model, name, _export_layer(layer, plan, cost, f"GBLR layer {name!r}", exact_masks))
    if dtype is not None:  # no GBLR widths are left: every GBLR layer is a plan now
        model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

