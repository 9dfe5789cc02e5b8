"""GBLRLinear: a generalized block-low-rank matrix learned with Gaudi masks.

    W = sum_k (mR_k ⊙ U_k)(mC_k ⊙ V_k)^T,   U_k: out x r,  V_k: in x r
    mR_k = gaudi_mask(widths[0, k], locations[0, k]; out),  mC_k = gaudi_mask(widths[1, k], locations[1, k]; in)

Parameters
- ``row_factors`` (K, r, out): U_k^T;  ``col_factors`` (K, r, in): V_k^T  (content, normal optimizer group)
- ``widths``, ``locations`` (2, K): fractions in [0, 1]; row side (over ``out``) first, then the column
  side (over ``in``).  Structural: their own optimizer group (Adam betas (0, 0.999), no weight decay),
  see :meth:`GBLRLinear.structural_parameters` and :func:`gsmsearch.structured.param_groups`.

Forward picks the cheaper of two exact evaluations each step, counting the multiply-adds of the
forward and of the backward it will need (weight and/or input gradients, see ``_use_factored``):
- factored: ``y = (x @ Vm^T) @ Um`` with the masked factors stacked to (K r, in) and (K r, out);
- dense: build ``W = Um^T Vm`` once per step and run one GEMM (cheaper when K r is large against
  the tokens, e.g. a first layer whose input needs no gradient).
Masks come from the index-space :func:`gaudi_mask` (a few gathers, no FFT).  Under ``no_grad``
the masked factors (and W when it is used) are cached while the parameters are unchanged: the key
holds each parameter's storage and version counter, which every in-place update bumps.
Components whose two intervals are both empty contribute nothing and receive no gradient, so they
are dropped from the computation; a component with one side still open is kept, because the empty
side's width gradient (bounded and non-zero at w = 0) is what lets it grow back.
In training, what depends only on the widths and locations -- the live components, the index
table rows, and (when neither needs a gradient: a frozen structure, fine-tuning a fit) the masks
themselves -- is computed again only when they change (the same version-counter key); a frozen
structure's masks stay in memory between steps (K' (in + out) values, the size of the factors at
rank 1).  Changing ``widths``/``locations`` through ``.data`` bypasses the version counter, as for
the inference cache: update them in place under ``torch.no_grad()`` instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import triton_runs, version_key
from ._cost import component_costs, gblr_flops, interval_lengths
from ._gblr_autograd import (all_grid_rows, gblr_linear, grid_rows, kernels_work, live_grid_rows, masked_factors,
                             side_sizes)
from ._mask import gaudi_mask, index_mask_forward

__all__ = ["GBLRLinear"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight.T + bias in one fused call (addmm), for (..., in) inputs."""
    return torch.nn.functional.linear(x, weight, bias)


def _dense_init_weight(out_features: int, in_features: int, generator=None) -> torch.Tensor:
    """nn.Linear's default init (kaiming uniform, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound


@register_family("gblr")
class GBLRLinear(StructuredLinear):
    """GBLR linear layer (``nn.Linear`` drop-in).

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        rank_per_component: r, rank of each component (method default 1).
        num_components: K; default ``min(in, out)`` (the method's setting).
        bias: learn an additive bias.
        sigma: Gaussian low-pass of the Gaudi masks; ``None`` = exact boxcar masks.  Trainers change
            it over time with :class:`gsmsearch.structured.SigmaSchedule` (``layer.sigma = ...``).
        (From scratch the widths start so that the cost equals the dense layer's -- the first
        quarter of the components full width, the rest a common shorter width -- with locations
        spread evenly so the whole matrix is covered.)
        recompute_intermediate: training memory.  The forward keeps the input, the parameters
            and the T x K' r intermediate x Vm^T for backward (masks and masked factors are
            rebuilt there, ``_gblr_autograd``); True drops the intermediate too, for one more GEMM
            in backward (bench/RESULTS.md "Training step" measures both).  Same results either way.

    On CUDA with Triton installed, each side's masks, masked factors and their gradients run as
    one Triton kernel each (``_mask_kernel``); set ``layer.use_kernels = False`` (or the class
    attribute) for the torch ops everywhere.  On that path the training forward reads the widths
    to the host once per step (to drop dead components); ``layer.sync_free = True`` skips that
    read: every component runs, a dead one with a zero mask (the same function and gradients,
    the GEMMs over all K components; for the GPU benchmark to compare, ``bench/gpu.sh``).
    """

    use_kernels = True
    sync_free = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank_per_component: int = 1,
        num_components: Optional[int] = None,
        bias: bool = True,
        sigma: Optional[float] = None,
        recompute_intermediate: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if int(rank_per_component) < 1:
            raise ValueError(f"rank_per_component must be >= 1, got {rank_per_component}")
        K = int(num_components) if num_components is not None else min(in_features, out_features)
        if K < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be positive or None, got {sigma}")
        self.rank = int(rank_per_component)
        self.num_components = K
        self.sigma = sigma
        self.recompute_intermediate = bool(recompute_intermediate)
        self.row_factors = nn.Parameter(torch.empty(K, self.rank, out_features))  # U_k^T
        self.col_factors = nn.Parameter(torch.empty(K, self.rank, in_features))  # V_k^T
        self.widths = nn.Parameter(torch.ones(2, K))
        self.locations = nn.Parameter(torch.zeros(2, K))
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """From-scratch init (method.md 4): SVD of a dense init split into K rank-r components,
        widths chosen so the starting cost equals the dense layer's."""
        m, n, K, r = self.out_features, self.in_features, self.num_components, self.rank
        weight = _dense_init_weight(m, n)
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # (m, q), (q,), (q, n)
        q = S.shape[0]
        root = S.sqrt()
        row = torch.zeros(K * r, m)
        col = torch.zeros(K * r, n)
        take = min(q, K * r)
        row[:take] = (U[:, :take] * root[:take]).T
        col[:take] = root[:take, None] * Vh[:take]
        # components beyond the SVD's rank get small random content so they can still learn
        if K * r > take:
            row[take:] = torch.randn(K * r - take, m) / math.sqrt(m)
            col[take:] = torch.randn(K * r - take, n) / math.sqrt(n)
        self.row_factors.copy_(row.view(K, r, m))
        self.col_factors.copy_(col.view(K, r, n))
        self.widths.copy_(self._widths_at_dense_cost())
        self.locations.copy_((torch.arange(K, dtype=torch.float32) / K).expand(2, K))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(n)
            self.bias.uniform_(-bound, bound)

    def _widths_at_dense_cost(self) -> torch.Tensor:
        """(2, K) widths: first quarter full, the rest a common width w, total cost ~ dense."""
        m, n, K, r = self.out_features, self.in_features, self.num_components, self.rank
        target = m * n
        full = max(1, K // 4)
        full_cost = r * (m + n)
        while full > 0 and full * full_cost > target:
            full -= 1
        widths = torch.zeros(2, K)
        widths[:, :full] = 1.0
        rest = K - full
        if rest > 0:
            left = target - full * full_cost
            # bisection on the common width of the remaining components
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                h = torch.tensor(round(mid * m))
                c = torch.tensor(round(mid * n))
                cost = rest * int(component_costs(h, c, r))
                lo, hi = (mid, hi) if cost <= left else (lo, mid)
            # snap each side to its grid (a float32 width exactly half-way would round up)
            widths[0, full:] = round(lo * m) / m
            widths[1, full:] = round(lo * n) / n
        return widths

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        budget: float,
        rank_per_component: int = 1,
        num_components: Optional[int] = None,
        method: str = "greedy",
        sigma: Optional[float] = None,
        seed: int = 0,
        recompute_intermediate: bool = False,
        **options,
    ) -> "GBLRLinear":
        """Fit a GBLR layer to a pre-trained ``weight`` (out x in) within ``budget`` (fraction of
        the dense FLOPs).  ``method="greedy"`` (interval-restricted power iteration with refits)
        finds planted block structure; ``method="reference"`` is the reference recipe (SVD, all
        widths 1, masked Adam fit with a uniform width shift onto the budget)."""
        from ._gblr_fit import fit_gblr

        budget = cls._check_budget(budget)
        weight = weight.detach()
        m, n = weight.shape
        fit = fit_gblr(
            weight.float(),
            budget,
            rank_per_component=rank_per_component,
            num_components=num_components,
            method=method,
            seed=seed,
            **options,
        )
        K = fit.widths.shape[1]
        layer = cls(
            n, m, rank_per_component=rank_per_component, num_components=K,
            bias=bias is not None, sigma=sigma, recompute_intermediate=recompute_intermediate,
        )
        with torch.no_grad():
            layer.widths.copy_(fit.widths)
            layer.locations.copy_(fit.locations)
            layer.row_factors.copy_(fit.row_factors)
            layer.col_factors.copy_(fit.col_factors)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer.to(weight.device, weight.dtype if weight.is_floating_point() else None)

    def config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank_per_component": self.rank,
            "num_components": self.num_components,
            "bias": self.bias is not None,
            "sigma": self.sigma,
            "recompute_intermediate": self.recompute_intermediate,
        }

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply``, except that a cast to a 16-bit float dtype (``.to(torch.bfloat16)``,
        ``.half()``) leaves the widths and locations in float32 (moved to the new device): they
        are fractions on an index grid of up to thousands of points, which 8 or 11 significant
        bits cannot name; the masks built from them stay float32 too (``_mask``)."""
        kept = {name: getattr(self, name).data for name in ("widths", "locations")}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            param = getattr(self, name)
            if param.dtype in (torch.bfloat16, torch.float16) and before.dtype not in (torch.bfloat16, torch.float16):
                param.data = before.to(param.device)
        return result

    # -- structure -----------------------------------------------------------------------------
    def structural_parameters(self):
        return iter((self.widths, self.locations))

    def interval_lengths(self) -> torch.Tensor:
        """(2, K) integer interval lengths on the grid (rows first)."""
        return interval_lengths(self.widths, (self.out_features, self.in_features))

    def interval_starts(self) -> torch.Tensor:
        """(2, K) integer interval starts on the grid (rows first), in [0, size)."""
        size = torch.tensor([self.out_features, self.in_features], device=self.locations.device)
        return torch.round(self.locations.detach() * size[:, None]).long().remainder(size[:, None])

    def live_components(self) -> torch.Tensor:
        """Indices of components with a non-empty interval on both sides (the ones that cost)."""
        lengths = self.interval_lengths()
        return torch.nonzero((lengths[0] > 0) & (lengths[1] > 0)).flatten()

    def flops(self) -> int:
        return gblr_flops(self.widths, (self.out_features, self.in_features), self.rank)

    def mean_width(self) -> float:
        return float(self.widths.detach().clamp(0, 1).mean())

    def structure_summary(self) -> dict:
        summary = super().structure_summary()
        lengths = self.interval_lengths()
        starts = self.interval_starts()
        live = self.live_components()
        summary.update(
            rank_per_component=self.rank,
            num_components=self.num_components,
            live_components=int(live.numel()),
            mean_width=self.mean_width(),
            # per live component: [row_start, row_len, col_start, col_len]
            intervals=torch.stack(
                [starts[0, live], lengths[0, live], starts[1, live], lengths[1, live]], 1
            ).tolist(),
        )
        return summary

    # -- computation ---------------------------------------------------------------------------
    def masks(self, sigma: Optional[float] = "layer"):
        """(row masks (K, out), column masks (K, in)) at ``sigma`` (default: the layer's)."""
        sigma = self.sigma if sigma == "layer" else sigma
        return (
            gaudi_mask(self.widths[0], self.locations[0], self.out_features, sigma),
            gaudi_mask(self.widths[1], self.locations[1], self.in_features, sigma),
        )

    def _active_components(self):
        """Indices of components with at least one non-empty side, or None when all are."""
        lengths = self.interval_lengths()
        active = (lengths[0] > 0) | (lengths[1] > 0)
        if bool(active.all()):
            return None
        return torch.nonzero(active).flatten()

    def _while_unchanged(self, name: str, params, compute, extra=()):
        """``compute()``, kept under ``name`` while ``params`` (and ``extra``) are unchanged (their
        version counters see every in-place update, as for the inference cache): with a frozen
        structure (``structure_lr = 0``, fine-tuning a fit) the training forward reads the widths
        from the device once, not on every step."""
        key = version_key(params) + tuple(extra)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != key:
            cached = (key, compute())
            self.__dict__[name] = cached
        return cached[1]

    def _training_structure(self):
        """(indices of the components that matter or None when all do, row side wraps, column
        side wraps), read from the device in one transfer: on a GPU every host read waits for the
        queued work to finish, and the training forward needs all three (one read each would be three).
        Computed again only when the widths change."""
        return self._while_unchanged("_structure_cache", (self.widths,), self._read_training_structure)

    def _read_training_structure(self):
        m, n = self.out_features, self.in_features
        w = self.widths.detach()
        rows, cols = torch.round(w[0] * m), torch.round(w[1] * n)
        active = (rows > 0) | (cols > 0)
        wraps = torch.stack([((rows >= m) | (rows < 0)).any(), ((cols >= n) | (cols < 0)).any()])
        host = torch.cat([wraps, active]).cpu()
        row_wrapped, col_wrapped, active = bool(host[0]), bool(host[1]), host[2:]
        index = None if bool(active.all()) else torch.nonzero(active).flatten().to(w.device)
        return index, row_wrapped, col_wrapped

    def _active_parameters(self, active: Optional[torch.Tensor]):
        """(widths, locations, row factors, col factors) of the components ``active`` (indices;
        None: all of them)."""
        if active is None:
            return self.widths, self.locations, self.row_factors, self.col_factors
        return (self.widths[:, active], self.locations[:, active],
                self.row_factors[active], self.col_factors[active])

    def _masked_factors(self, sigma="layer"):
        """Stacked masked factors over the components that matter: (K' r, out), (K' r, in)."""
        widths, locations, row_factors, col_factors = self._active_parameters(self._active_components())
        sigma = self.sigma if sigma == "layer" else sigma
        row_mask = gaudi_mask(widths[0], locations[0], self.out_features, sigma)  # (K', out)
        col_mask = gaudi_mask(widths[1], locations[1], self.in_features, sigma)  # (K', in)
        return masked_factors(row_factors, row_mask), masked_factors(col_factors, col_mask)

    def _cache_key(self, x: torch.Tensor):
        params = (self.widths, self.locations, self.row_factors, self.col_factors)
        return (self.sigma, x.dtype, x.device) + version_key(params)

    def _inference_factors(self, x: torch.Tensor):
        """Masked factors under no_grad, cached while the parameters are unchanged (their version
        counters see every in-place update, so an optimizer step or ``copy_`` invalidates)."""
        key = self._cache_key(x)
        cache = self.__dict__.get("_factor_cache")
        if cache is None or cache[0] != key:
            Um, Vm = self._masked_factors()
            cache = (key, Um.to(x.dtype), Vm.to(x.dtype), {})
            self.__dict__["_factor_cache"] = cache
        return cache

    def _use_factored(self, tokens: int, inner: int, weight_grad: bool, input_grad: bool) -> bool:
        """Multiply-adds of the two exact evaluations, forward plus what backward will need.

        factored: x Vm^T, t Um;  backward dt = dy Um^T, dUm = t^T dy, dVm = dt^T x, dx = dt Vm.
        dense: W = Um^T Vm, x W^T;  backward dW = dy^T x, dUm = Vm dW^T, dVm = Um dW, dx = dy W.
        """
        m, n = self.out_features, self.in_features
        factored = tokens * inner * (m + n)
        dense = inner * m * n + tokens * m * n
        if weight_grad:
            factored += tokens * inner * (2 * m + n)
            dense += tokens * m * n + 2 * inner * m * n
        if input_grad:
            factored += tokens * inner * n + (0 if weight_grad else tokens * inner * m)
            dense += tokens * m * n
        return factored <= dense

    def to_dense(self) -> torch.Tensor:
        Um, Vm = self._masked_factors()
        return Um.T @ Vm  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        bias = self.bias
        if not torch.is_grad_enabled():
            _, Um, Vm, dense = self._inference_factors(x)
            inner, m, n = Um.shape[0], self.out_features, self.in_features
            if "W" in dense:  # W already built: only the per-token costs compare
                use_factored = inner * (m + n) <= m * n
            else:
                use_factored = self._use_factored(tokens, inner, False, False)
            if use_factored:
                y = _linear((x @ Vm.T), Um.T, bias)  # (..., K' r) -> (..., out)
            else:
                if "W" not in dense:
                    dense["W"] = Um.T @ Vm  # (out, in), reused while the parameters are unchanged
                y = _linear(x, dense["W"], bias)
            return y
        rows = masks = None
        if self.use_kernels and triton_runs(x) and kernels_work(x.device):  # Triton: wraps per component
            if self.sync_free:  # no host read: every component, the dead ones masked to zero
                active, rows = None, all_grid_rows(self.widths, self.locations, self.out_features,
                                                   self.in_features)
            else:  # one host read, only when the structure changed
                active, rows = self._while_unchanged(
                    "_rows_cache", (self.widths, self.locations),
                    lambda: live_grid_rows(self.widths, self.locations, self.out_features, self.in_features))
            row_wrapped = col_wrapped = None
        else:
            active, row_wrapped, col_wrapped = self._training_structure()
        widths, locations, row_factors, col_factors = self._active_parameters(active)
        if rows is None:  # the torch path: both sides' table rows, once per structure
            sizes = side_sizes(self.out_features, self.in_features, widths.device)
            rows = self._while_unchanged("_torch_rows_cache", (self.widths, self.locations),
                                         lambda: grid_rows(widths, locations, sizes))
            kernels = False
            if not (self.widths.requires_grad or self.locations.requires_grad):
                # a frozen structure: its masks are kept between steps (K' (out + in) values, the
                # factors' size at rank 1) instead of being built twice per step
                masks = self._while_unchanged(
                    "_mask_cache", (self.widths, self.locations),
                    lambda: self._frozen_masks(widths, locations, rows, row_wrapped, col_wrapped),
                    extra=(self.sigma,))
        else:
            kernels = True
        weight_grad = any(
            p.requires_grad for p in (self.row_factors, self.col_factors, self.widths, self.locations)
        )
        inner = row_factors.shape[0] * self.rank
        factored = self._use_factored(tokens, inner, weight_grad, x.requires_grad)
        return gblr_linear(x, widths, locations, row_factors, col_factors, bias, self.sigma,
                           factored=factored, recompute_inner=self.recompute_intermediate,
                           wrapped=(row_wrapped, col_wrapped), kernels=kernels, rows=rows, masks=masks)

    def _frozen_masks(self, widths, locations, rows, row_wrapped: bool, col_wrapped: bool):
        """Both sides' masks of these (live) widths and locations, as the training Function builds
        them (``index_mask_forward`` on the same table rows)."""
        with torch.no_grad():
            row_mask = index_mask_forward(widths[0], locations[0], self.out_features, self.sigma, row_wrapped,
                                          (rows[0, 0], rows[1, 0], rows[2, 0]))[0]
            col_mask = index_mask_forward(widths[1], locations[1], self.in_features, self.sigma, col_wrapped,
                                          (rows[0, 1], rows[1, 1], rows[2, 1]))[0]
        return row_mask, col_mask

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", rank_per_component={self.rank}, num_components={self.num_components}, sigma={self.sigma}"
        )
