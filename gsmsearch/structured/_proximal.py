"""Proximal structure learning: the soft-threshold step on widths, budget controllers, sigma schedule.

The method trains GBLR widths with an L1 penalty ``lambda * sum(widths)`` handled by a proximal
step after every optimizer step (method.md section 3):

    widths    <- clamp(softshrink(widths, lambda * lr_width), 0, 1)
    locations <- locations mod 1

The proximal step always runs (it is what keeps widths in [0, 1] and locations in [0, 1), the
ranges the masks, the FLOP count and the export assume).  Budget controllers act on the whole
model's GBLR layers together (a model has one budget, spread across layers by training):
- :class:`ProximalOnly`: the proximal step alone, no budget projection (``budget_control: none``;
  a training loop without a controller runs this one);
- :class:`StopShrinkingAtTarget`: the proximal step is skipped once the mean width is at or below
  the target (the reference's ViT recipe);
- :class:`ProjectMeanWidth`: after each step the widths are projected onto ``mean == target``
  (Euclidean projection onto the box-constrained hyperplane: a uniform shift then a clamp, the
  shift found by bisection; the reference's GPT-2 recipe);
- :class:`ProjectFlops`: the same shift, chosen so the model's GBLR FLOPs are at most a target
  fraction of their dense FLOPs (the budget a study states).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._base import StructuredLinear
from ._common import version_key

__all__ = [
    "gblr_layers",
    "proximal_step",
    "mean_width",
    "BudgetController",
    "ProximalOnly",
    "StopShrinkingAtTarget",
    "ProjectMeanWidth",
    "ProjectFlops",
    "SigmaSchedule",
    "set_sigma",
    "param_groups",
]


def gblr_layers(model: nn.Module) -> List[nn.Module]:
    """Every module of ``model`` (itself included) that has learnable widths and locations."""
    from ._gblr import GBLRLinear

    return [m for m in model.modules() if isinstance(m, GBLRLinear)]


def mean_width(layers: Iterable[nn.Module]) -> float:
    widths = [layer.widths.detach().flatten() for layer in layers]
    return float(torch.cat(widths).mean()) if widths else float("nan")


@torch.no_grad()
def proximal_step(layers: Iterable[nn.Module], lam: float, lr_width: float) -> None:
    """Soft-threshold widths by ``lam * lr_width``, clamp to [0, 1]; wrap locations into [0, 1)."""
    threshold = float(lam) * float(lr_width)
    if threshold < 0:
        raise ValueError(f"lambda * lr_width must be >= 0, got {threshold}")
    for layer in layers:
        layer.widths.copy_(torch.nn.functional.softshrink(layer.widths, threshold).clamp_(0.0, 1.0))
        _wrap_(layer.locations)


def _wrap_(locations: torch.Tensor) -> None:
    """Locations into [0, 1) in place.  ``remainder`` alone can give exactly 1.0 (a tiny negative
    location plus 1 rounds up), which the next wrap would turn into 0.0; 1.0 is the same grid
    position as 0.0, so it is stored as 0.0 and wrapping twice is wrapping once."""
    locations.remainder_(1.0)
    locations.masked_fill_(locations >= 1.0, 0.0)


@torch.no_grad()
def _clamp_all(layers) -> None:
    for layer in layers:
        layer.widths.clamp_(0.0, 1.0)
        _wrap_(layer.locations)


def _bisect_shift(evaluate, target: float, iterations: int = 50, low: float = 0.0) -> float:
    """Smallest shift t in [low, 1] with evaluate(t) <= target (evaluate non-increasing in t).
    With ``low = 0`` widths are only ever lowered; ``low = -1`` allows raising them too."""
    if evaluate(low) <= target:
        return low
    lo, hi = low, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if evaluate(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


class BudgetController:
    """Called after every optimizer step with the model's GBLR layers and the step's lambda and
    width learning rate; applies the proximal step (or not) and any projection."""

    def step(self, layers: List[nn.Module], lam: float, lr_width: float) -> None:  # pragma: no cover
        raise NotImplementedError


def _structure_state(layers) -> tuple:
    """The widths' and locations' identities and version counters (no read from the device)."""
    return version_key(p for layer in layers for p in (layer.widths, layer.locations))


@dataclass
class ProximalOnly(BudgetController):
    """The proximal step alone: widths soft-thresholded by ``lam * lr_width`` and clamped to
    [0, 1], locations wrapped into [0, 1); no budget projection."""

    # the widths' and locations' identities and version counters after the last step
    _after_last_step: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    @torch.no_grad()
    def step(self, layers, lam, lr_width):
        # With a zero threshold and nothing changed since this controller's last step, the step
        # is the identity (its clamp and wrap find every value where they put it): skipped, which
        # keeps the layers' cached structure valid (a frozen structure, fine-tuning a fit).
        if float(lam) * float(lr_width) == 0.0 and self._after_last_step == _structure_state(layers):
            return
        proximal_step(layers, lam, lr_width)
        self._after_last_step = _structure_state(layers)


@dataclass
class StopShrinkingAtTarget(BudgetController):
    """Proximal step only while the mean width is above ``target_mean_width``."""

    target_mean_width: float

    def __post_init__(self):
        if not 0.0 <= self.target_mean_width <= 1.0:
            raise ValueError(f"target_mean_width must be in [0, 1], got {self.target_mean_width}")

    def step(self, layers, lam, lr_width):
        if mean_width(layers) > self.target_mean_width:
            proximal_step(layers, lam, lr_width)
        else:
            _clamp_all(layers)


@dataclass
class ProjectMeanWidth(BudgetController):
    """Proximal step, then project the widths onto ``mean == target_mean_width`` (the Euclidean
    projection onto that hyperplane within the [0, 1] box: one common shift, then a clamp)."""

    target_mean_width: float

    def __post_init__(self):
        if not 0.0 <= self.target_mean_width <= 1.0:
            raise ValueError(f"target_mean_width must be in [0, 1], got {self.target_mean_width}")

    @torch.no_grad()
    def step(self, layers, lam, lr_width):
        proximal_step(layers, lam, lr_width)
        # bisection on a host copy: one read from a GPU instead of one per bisection step
        widths = torch.cat([layer.widths.flatten() for layer in layers]).cpu()
        shift = _bisect_shift(
            lambda t: float((widths - t).clamp(0, 1).mean()), self.target_mean_width, low=-1.0
        )
        if shift != 0:
            for layer in layers:
                layer.widths.sub_(shift).clamp_(0.0, 1.0)


@dataclass
class ProjectFlops(BudgetController):
    """Proximal step, then shift all widths down until the GBLR layers' FLOPs are at most
    ``target_relative_flops`` of their dense FLOPs.

    ``weights``: one multiplier per layer, in the order of the ``layers`` given to :meth:`step`
    (rows each layer processes per sample, where layers see different counts, as an MLP-Mixer's
    token- and channel-mixing layers do); None = every layer counts once.
    """

    target_relative_flops: float
    weights: Optional[Sequence[float]] = None
    # what the last step left: (target, weights, the widths' and locations' identities and
    # version counters), for recognising a step that can only be the identity
    _after_last_step: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not 0.0 < self.target_relative_flops <= 1.0:
            raise ValueError(
                f"target_relative_flops must be in (0, 1], got {self.target_relative_flops}"
            )

    def _state(self, layers) -> tuple:
        structure = _structure_state(layers)
        weights = None if self.weights is None else tuple(float(w) for w in self.weights)
        return (float(self.target_relative_flops), weights, structure)

    @torch.no_grad()
    def step(self, layers, lam, lr_width):
        # A frozen structure (lam * lr_width == 0) that nothing has changed since this
        # controller's last step, under the same target: the step is the identity -- the
        # proximal step's threshold is 0 and its clamp and wrap find every value in range (it
        # put them there), and the projection finds the budget met (it met it) -- so it is
        # skipped, which also keeps the layers' cached structure (GBLRLinear) valid and spares
        # a host read of the widths per step.
        if float(lam) * float(lr_width) == 0.0 and self._after_last_step == self._state(layers):
            return
        self._project(layers, lam, lr_width)
        self._after_last_step = self._state(layers)

    def _project(self, layers, lam, lr_width):
        proximal_step(layers, lam, lr_width)
        weights = [1.0] * len(layers) if self.weights is None else [float(w) for w in self.weights]
        if len(weights) != len(layers):
            raise ValueError(f"ProjectFlops has {len(weights)} weights for {len(layers)} layers")
        dense = sum(w * layer.in_features * layer.out_features for w, layer in zip(weights, layers))
        target = self.target_relative_flops * dense

        # bisection on a host copy of every layer's widths: one read from a GPU per step instead
        # of one per layer and bisection step (each read waits for the GPU's queue to drain)
        host = torch.cat([layer.widths.flatten() for layer in layers]).cpu()
        host_widths = [w.view(2, -1) for w in host.split([layer.widths.numel() for layer in layers])]
        # every layer's components in one row of numpy arrays, so that each of the bisection's
        # ~45 evaluations is a few vector ops, not a dozen torch dispatches per layer (with a
        # binding budget those take longer than the model's forward and backward); the same per-element float arithmetic as torch's (NumPy
        # computes a float32 array minus a Python float in float32, as torch does), the layers'
        # integer costs summed exactly and weighted in layer order
        counts = [w.shape[1] for w in host_widths]
        rows = torch.cat([w[0] for w in host_widths])
        cols = torch.cat([w[1] for w in host_widths])
        per_component = lambda values, dtype: torch.tensor(values, dtype=dtype).repeat_interleave(torch.tensor(counts))
        out_sizes = per_component([layer.out_features for layer in layers], rows.dtype)
        in_sizes = per_component([layer.in_features for layer in layers], rows.dtype)
        ranks = np.repeat(np.array([layer.rank for layer in layers], dtype=np.int64), counts)
        bounds = np.concatenate([[0], np.cumsum(counts)])  # layer l: components bounds[l]:bounds[l+1]
        as_numpy = rows.dtype in (torch.float32, torch.float64)  # NumPy has no bfloat16
        if as_numpy:
            rows, cols, out_sizes, in_sizes = (t.numpy() for t in (rows, cols, out_sizes, in_sizes))

        def flops_after(shift: float) -> float:
            if as_numpy:
                h = np.round(np.clip(rows - shift, 0, 1) * out_sizes).astype(np.int64)
                c = np.round(np.clip(cols - shift, 0, 1) * in_sizes).astype(np.int64)
            else:  # the same arithmetic in torch
                h = torch.round((rows - shift).clamp(0, 1) * out_sizes).long().numpy()
                c = torch.round((cols - shift).clamp(0, 1) * in_sizes).long().numpy()
            costs = np.where((h > 0) & (c > 0), np.minimum(ranks * (h + c), h * c), 0)
            running = np.concatenate([[0], np.cumsum(costs)])  # int64: exact
            sums = running[bounds[1:]] - running[bounds[:-1]]
            total = 0.0
            for weight, layer_flops in zip(weights, sums.tolist()):
                total += weight * layer_flops
            return total

        shift = _bisect_shift(flops_after, target)
        if shift > 0:
            for layer in layers:
                layer.widths.sub_(shift).clamp_(0.0, 1.0)


@dataclass
class SigmaSchedule:
    """Gaussian low-pass of the Gaudi masks over training.

    ``sigma_init`` until ``start_epoch``, then linear to ``sigma_final`` at ``end_epoch`` (epochs
    may be fractional).  ``sigma_init=None`` means exact boxcar masks throughout.
    The method's from-scratch setting: SigmaSchedule(1.0, 100.0, start_epoch=5, end_epoch=E).
    """

    sigma_init: Optional[float] = 1.0
    sigma_final: Optional[float] = 100.0
    start_epoch: float = 5.0
    end_epoch: float = 100.0

    def __post_init__(self):
        if self.sigma_init is None:
            return
        if not self.sigma_init > 0 or self.sigma_final is None or not self.sigma_final > 0:
            raise ValueError(
                f"sigma_init and sigma_final must be positive (or sigma_init None for exact masks), "
                f"got {self.sigma_init} and {self.sigma_final}"
            )
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})"
            )

    def __call__(self, epoch: float) -> Optional[float]:
        if self.sigma_init is None:
            return None
        if epoch <= self.start_epoch or self.end_epoch == self.start_epoch:
            return float(self.sigma_init) if epoch <= self.start_epoch else float(self.sigma_final)
        t = min(1.0, (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch))
        return float(self.sigma_init + t * (self.sigma_final - self.sigma_init))


def set_sigma(model: nn.Module, sigma: Optional[float]) -> None:
    for layer in gblr_layers(model):
        layer.sigma = sigma


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    structure_lr: float,
    weight_decay: float = 0.0,
) -> List[dict]:
    """Optimizer groups: content parameters (lr, weight_decay) and structural parameters
    (structure_lr, Adam betas (0, 0.999), no weight decay).  Works for Adam and AdamW."""
    structural = []
    for module in model.modules():
        if isinstance(module, StructuredLinear):
            structural.extend(module.structural_parameters())
    ids = {id(p) for p in structural}
    content = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": content, "lr": lr, "weight_decay": weight_decay, "name": "content"}]
    if structural:
        groups.append(
            {
                "params": structural,
                "lr": structure_lr,
                "betas": (0.0, 0.999),
                "weight_decay": 0.0,
                "name": "structure",
            }
        )
    return groups
