"""Training-step benchmark: one GBLR layer's forward + backward against nn.Linear and against the
reference implementation's way (dense masked matrix rebuilt every step from irfft masks).

Every candidate recomputes its masks each step, as in training, except ``gblr_cached_masks``
(masks computed once, outside the step: the lower bound that mask construction can approach).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gsmsearch.structured import GBLRLinear
from gsmsearch.structured._mask import gaudi_mask, gaudi_mask_reference

from ._timing import interleaved, ratios, tensor_memory


class UnfusedGBLR(GBLRLinear):
    """The layer's training forward written as plain autograd: autograd through masks, masked factors and
    GEMMs composed of torch ops (it keeps masks and masked factors for backward)."""

    def forward(self, x):
        Um, Vm = self._masked_factors()
        if self._use_factored(x.numel() // self.in_features, Um.shape[0], True, x.requires_grad):
            return nn.functional.linear(x @ Vm.T, Um.T, self.bias)
        return nn.functional.linear(x, Um.T @ Vm, self.bias)


def _variant(layer: GBLRLinear, cls=GBLRLinear, recompute: bool = False) -> GBLRLinear:
    """A copy of ``layer`` (same weights) as ``cls``, with ``recompute_intermediate``."""
    copy = cls(**{**layer.config(), "recompute_intermediate": recompute})
    copy.load_state_dict(layer.state_dict())
    return copy


def _reference_step(layer: GBLRLinear, x: torch.Tensor, sigma: Optional[float]):
    """The reference code's way: irfft masks (autograd through complex ops), W built densely."""
    m, n = layer.out_features, layer.in_features

    def step():
        row_mask = gaudi_mask_reference(layer.widths[0], layer.locations[0], m, sigma)  # (K, m)
        col_mask = gaudi_mask_reference(layer.widths[1], layer.locations[1], n, sigma)  # (K, n)
        Um = (layer.row_factors * row_mask[:, None, :]).reshape(-1, m)  # (K r, m)
        Vm = (layer.col_factors * col_mask[:, None, :]).reshape(-1, n)  # (K r, n)
        y = x @ (Um.T @ Vm).T + layer.bias
        y.backward(torch.ones_like(y))

    return step


def structure_moved(module: nn.Module) -> None:
    """What an optimizer step does to a GBLR layer's widths and locations, for a step timed
    without one: it changes them in place (their version counters move), so the next forward
    reads the structure again as in training from scratch.  No effect on other modules."""
    if isinstance(module, GBLRLinear):
        with torch.no_grad():
            module.widths.add_(0.0)
            module.locations.add_(0.0)


def _layer_step(module: nn.Module, x: torch.Tensor):
    def step():
        structure_moved(module)  # structure learned while training: read every step
        y = module(x)
        y.backward(torch.ones_like(y))

    return step


def _cached_mask_step(layer: GBLRLinear, x: torch.Tensor):
    with torch.no_grad():
        row_mask, col_mask = layer.masks()
    m, n = layer.out_features, layer.in_features

    def step():
        Um = (layer.row_factors * row_mask[:, None, :]).reshape(-1, m)
        Vm = (layer.col_factors * col_mask[:, None, :]).reshape(-1, n)
        y = nn.functional.linear(x @ Vm.T, Um.T, layer.bias)
        y.backward(torch.ones_like(y))

    return step


def _mask_step(layer: GBLRLinear, fn, sigma):
    m, n = layer.out_features, layer.in_features

    def step():
        row_mask = fn(layer.widths[0], layer.locations[0], m, sigma)
        col_mask = fn(layer.widths[1], layer.locations[1], n, sigma)
        (row_mask.sum() + col_mask.sum()).backward()

    return step


def _forced(layer: GBLRLinear, factored: bool) -> GBLRLinear:
    forced = _variant(layer)
    forced._use_factored = lambda *args, **kwargs: factored  # instance override, benchmark only
    return forced


def run(
    *, in_features=768, out_features=3072, num_components=768, tokens=2048, sigma=5.0,
    repeats=7, input_grad=True, seed=0, include_reference=True,
) -> dict:
    torch.manual_seed(seed)
    x = torch.randn(tokens, in_features, requires_grad=input_grad)
    linear = nn.Linear(in_features, out_features)
    exact = GBLRLinear(in_features, out_features, num_components=num_components, sigma=None)
    blurred = GBLRLinear(in_features, out_features, num_components=num_components, sigma=sigma)
    blurred.load_state_dict(exact.state_dict())
    candidates = {
        "nn.Linear": _layer_step(linear, x),
        "gblr sigma=None": _layer_step(exact, x),
        f"gblr sigma={sigma:g}": _layer_step(blurred, x),
        f"gblr sigma={sigma:g} factored": _layer_step(_forced(blurred, True), x),
        f"gblr sigma={sigma:g} dense-build": _layer_step(_forced(blurred, False), x),
        f"gblr sigma={sigma:g} recompute intermediate": _layer_step(_variant(blurred, recompute=True), x),
        f"gblr sigma={sigma:g} unfused": _layer_step(_variant(blurred, UnfusedGBLR), x),
        "gblr cached masks (bound)": _cached_mask_step(blurred, x),
        f"masks only sigma={sigma:g}": _mask_step(blurred, gaudi_mask, sigma),
        "masks only sigma=None": _mask_step(exact, gaudi_mask, None),
    }
    if include_reference:
        candidates[f"reference sigma={sigma:g}"] = _reference_step(blurred, x, sigma)
        candidates[f"reference masks only sigma={sigma:g}"] = _mask_step(blurred, gaudi_mask_reference, sigma)
    memory_layers = {
        "nn.Linear": linear,
        f"gblr sigma={sigma:g}": blurred,
        f"gblr sigma={sigma:g} recompute intermediate": _variant(blurred, recompute=True),
        f"gblr sigma={sigma:g} unfused": _variant(blurred, UnfusedGBLR),
    }
    memory = {name: tensor_memory(_layer_step(module, x), exclude=[x, *module.parameters()])
              for name, module in memory_layers.items()}
    results = interleaved(candidates, repeats=repeats)
    rel = ratios(results, "nn.Linear")
    for name in results:
        results[name].update(rel[name])
    step = results[f"gblr sigma={sigma:g}"]
    exact_step = results["gblr sigma=None"]
    m, n, K, T = out_features, in_features, num_components, tokens
    flop_ratio = (K * (m + n) * (3 if input_grad else 2) + (0 if input_grad else K * m)) / (
        m * n * (3 if input_grad else 2)
    )
    return {
        "config": {
            "in_features": n, "out_features": m, "num_components": K, "rank_per_component": 1,
            "tokens": T, "dtype": "float32", "sigma": sigma, "input_requires_grad": input_grad,
            "repeats": repeats, "widths": "from-scratch init (cost about dense)",
        },
        "results": results,
        "tensor_memory_mib": memory,
        "mask_share": {
            f"sigma={sigma:g}": results[f"masks only sigma={sigma:g}"]["wall_ms"] / step["wall_ms"],
            "sigma=None": results["masks only sigma=None"]["wall_ms"] / exact_step["wall_ms"],
        },
        "factored_gemm_flop_ratio": flop_ratio,
        "path_chosen": "factored" if blurred._use_factored(T, K, True, input_grad) else "dense-build",
    }
