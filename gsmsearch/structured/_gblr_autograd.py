"""GBLR's training computation (masks, masked factors, GEMMs) as one autograd Function.

Autograd through the plain composition keeps, per layer and until backward, both masks and both
masked factors (K' x out and K' x in each, whatever the batch: 22.5 MiB at K = 768, 768 -> 3072)
next to the intermediate x Vm^T.  This Function keeps the input (which the caller holds anyway),
the parameters, the grid-rounded widths/locations and -- unless ``recompute_inner`` -- the
intermediate, and rebuilds masks and masked factors in backward from the cached index tables (a
few gathers and products, about 2% of the step).  ``recompute_inner`` also drops the T x K' r
intermediate for one more GEMM (T K' r n multiply-adds), leaving nn.Linear's activation memory.
The dense-build evaluation keeps W (out x in) when the input needs a gradient, as F.linear would.

Two evaluations of the same function (the layer picks by counting multiply-adds):
- factored: y = (x Vm^T) Um + b
- dense-build: W = Um^T Vm, y = x W^T + b (cheaper when the input needs no gradient)
where Um = row_factors * row_mask (K' r, out) and Vm = col_factors * col_mask (K' r, in).

First derivatives only: gradients computed with ``create_graph=True`` do not carry a graph
(``once_differentiable``).  Under autocast the GEMMs run in the autocast dtype (as F.linear's would); masks and parameter
gradients stay in the parameters' dtype.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._common import triton_runs
from ._mask import _index_rows, flat_index_tables, index_mask_backward, index_mask_forward

__all__ = ["gblr_linear", "masked_factors", "all_grid_rows", "live_grid_rows"]


def masked_factors(factors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K', r, d) factors times (K', d) masks, flattened to (K' r, d)."""
    return (factors * mask[:, None, :]).reshape(-1, factors.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


class _GBLRLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_width, row_location, col_width, col_location, row_factors, col_factors,
                bias, sigma, factored, recompute_inner, wrapped, rows, masks):
        m, n = row_factors.shape[-1], col_factors.shape[-1]
        dtype = _compute_dtype(x)
        # each side's table rows (upper, lower, whole periods): given by the layer (computed once
        # per structure) or computed here, and kept for backward either way
        if rows is None:
            rows = (_index_rows(row_width, row_location, m), _index_rows(col_width, col_location, n))
        else:
            rows = ((rows[0, 0], rows[1, 0], rows[2, 0]), (rows[0, 1], rows[1, 1], rows[2, 1]))
        with torch.autocast(x.device.type, enabled=False):
            if masks is not None:  # a frozen structure's masks, kept by the layer (read only here)
                (row_mask, col_mask), row_wrapped, col_wrapped = masks, wrapped[0], wrapped[1]
            else:
                row_mask, _, _, row_wrapped = index_mask_forward(row_width, row_location, m, sigma, wrapped[0],
                                                                 rows[0])
                col_mask, _, _, col_wrapped = index_mask_forward(col_width, col_location, n, sigma, wrapped[1],
                                                                 rows[1])
            Um = masked_factors(row_factors, row_mask).to(dtype)
            Vm = masked_factors(col_factors, col_mask).to(dtype)
            del row_mask, col_mask
            x2 = x.reshape(-1, n).to(dtype)
            b = bias.to(dtype) if bias is not None else None
            inner = W = None
            if factored:
                inner = x2 @ Vm.T  # (T, K' r)
                y = torch.addmm(b, inner, Um) if b is not None else inner @ Um
            else:
                W = Um.T @ Vm  # (m, n)
                y = torch.addmm(b, x2, W.T) if b is not None else x2 @ W.T
        # factored: the intermediate, unless recomputed; dense-build: W when the input needs a
        # gradient (dy W; rebuilding it would cost a K' r m n GEMM, what the path choice assumed kept)
        kept = (inner if not recompute_inner else None) if factored else (W if ctx.needs_input_grad[0] else None)
        ctx.save_for_backward(x, row_width, row_location, col_width, col_location, row_factors,
                              col_factors, kept)
        ctx.sigma, ctx.factored, ctx.dtype, ctx.has_bias = sigma, factored, dtype, bias is not None
        ctx.wrapped = (row_wrapped, col_wrapped)  # backward rebuilds the masks without re-checking
        ctx.rows, ctx.masks = rows, masks
        return y.reshape(*x.shape[:-1], m)

    @staticmethod
    @once_differentiable  # second derivatives (create_graph=True) raise instead of being wrong
    def backward(ctx, grad_y):
        # Order matters for the peak: each side's mask lives only while its side is processed,
        # each (K' r, d) buffer is reused in place where the next value allows it, and the
        # dense-build path takes d Um before it builds the row side.
        x, row_width, row_location, col_width, col_location, row_factors, col_factors, kept = ctx.saved_tensors
        needs = ctx.needs_input_grad
        m, n = row_factors.shape[-1], col_factors.shape[-1]
        dtype, sigma = ctx.dtype, ctx.sigma
        with torch.autocast(x.device.type, enabled=False):
            dy = grad_y.reshape(-1, m).to(dtype)
            x2 = x.reshape(-1, n).to(dtype)
            row_wrapped, col_wrapped = ctx.wrapped
            row_rows, col_rows = ctx.rows

            def side_mask(side, width, location, size, wrapped, side_rows):  # (mask, upper, lower)
                if ctx.masks is not None:
                    return ctx.masks[side], side_rows[0], side_rows[1]
                return index_mask_forward(width, location, size, sigma, wrapped, side_rows)[:3]

            col_mask, col_upper, col_lower = side_mask(1, col_width, col_location, n, col_wrapped, col_rows)
            Vm = masked_factors(col_factors, col_mask).to(dtype)
            grad_x = None
            if ctx.factored:
                row_mask, row_upper, row_lower = side_mask(0, row_width, row_location, m, row_wrapped, row_rows)
                Um = masked_factors(row_factors, row_mask).to(dtype)
                inner = kept if kept is not None else x2 @ Vm.T  # (T, K' r), kept or recomputed
                d_inner = dy @ Um.T  # (T, K' r)
                del Um
                held = [inner.T @ dy, row_mask]  # d Um (K' r, m)
                del inner, kept, row_mask
                row_grads = _side_grads(held, row_factors, row_upper, row_lower, sigma, *needs[1:3], needs[5])
                dVm = d_inner.T @ x2  # (K' r, n)
                if needs[0]:
                    grad_x = d_inner @ Vm
                del d_inner, Vm
            else:
                dW = dy.T @ x2  # (m, n)
                if needs[0]:
                    grad_x = dy @ kept  # W (m, n)
                dUm = Vm @ dW.T  # before the row side is built: Vm is done with here
                del Vm, kept
                row_mask, row_upper, row_lower = side_mask(0, row_width, row_location, m, row_wrapped, row_rows)
                Um = masked_factors(row_factors, row_mask).to(dtype)
                dVm = Um @ dW
                del Um, dW
                held = [dUm, row_mask]
                del dUm, row_mask
                row_grads = _side_grads(held, row_factors, row_upper, row_lower, sigma, *needs[1:3], needs[5])
            del x2
            held = [dVm, col_mask]
            del dVm, col_mask
            col_grads = _side_grads(held, col_factors, col_upper, col_lower, sigma, *needs[3:5], needs[6])
            grad_bias = dy.sum(0) if ctx.has_bias and needs[7] else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        (d_row_width, d_row_location, d_row_factors), (d_col_width, d_col_location, d_col_factors) = row_grads, col_grads
        return (grad_x, d_row_width, d_row_location, d_col_width, d_col_location, d_row_factors,
                d_col_factors, grad_bias, None, None, None, None, None, None)


@functools.lru_cache(maxsize=64)
def side_sizes(m: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[m], [n]], device=device)  # (2, 1): both sides' lengths at once


def grid_rows(widths: torch.Tensor, locations: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Both sides' table rows at once (``_mask._index_rows`` on the stacked (2, K) widths and
    locations, ``sizes`` (2, 1) = [[m], [n]]): (3, 2, K) int64 = (upper, lower, whole periods)."""
    return torch.stack(_index_rows(widths, locations, sizes))


def _live(widths: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(K,) whether each component has an interval of positive length on either side (the
    ones the training forward runs), from (2, K) widths and (2, 1) sizes."""
    return torch.round(widths * sizes).gt(0).any(0)


def live_grid_rows(widths: torch.Tensor, locations: torch.Tensor, m: int, n: int):
    """(indices of the live components or None when all are, their :func:`grid_rows`) for the
    Triton path, from one device-to-host read: the widths and locations are read once (the read
    that finding the live components needs anyway), the rows computed on the host and sent back
    in one copy -- a dozen fewer launches than computing them on the device."""
    host = torch.cat([widths.detach(), locations.detach()]).cpu()  # (4, K)
    sizes = torch.tensor([[m], [n]])
    live = _live(host[:2], sizes)
    index = None if bool(live.all()) else torch.nonzero(live).flatten()
    if index is not None:
        host = host[:, index]
    rows = grid_rows(host[:2], host[2:], sizes).to(widths.device, non_blocking=True)
    return (None if index is None else index.to(widths.device, non_blocking=True)), rows


def all_grid_rows(widths: torch.Tensor, locations: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """:func:`grid_rows` of every component, computed on the device without a host read (the
    sync-free training path, ``GBLRLinear.sync_free``).  A component that :func:`live_grid_rows`
    would leave out (no interval of positive length) gets lower = upper and no whole periods:
    a zero mask, so it adds exact zeros to the output and gets exact-zero gradients, as if it
    had been dropped."""
    sizes = side_sizes(m, n, widths.device)
    upper, lower, wraps = _index_rows(widths, locations, sizes)
    live = _live(widths.detach(), sizes)  # as live_grid_rows finds them
    return torch.stack((upper, torch.where(live, lower, upper), wraps * live))


class _Sides:
    """Both sides' grid rows for the Triton kernels (:func:`grid_rows`, given or computed on the
    device), kept for backward.  Row 0 is the row side (length m), row 1 the column side (n)."""

    def __init__(self, widths, locations, m: int, n: int, sigma: Optional[float], factors: torch.Tensor,
                 rows: Optional[torch.Tensor] = None):
        if rows is None:
            rows = grid_rows(widths, locations, side_sizes(m, n, widths.device))
        self.upper, self.lower = rows[0], rows[1]
        # the tables, masks and width/location gradients in the widths' dtype where the factors
        # are 16-bit (float32 prefix sums), else in the factors' dtype (the torch path's arithmetic)
        self.dtype = torch.promote_types(factors.dtype, widths.dtype)
        self.wraps = rows[2].to(self.dtype)
        self.tables = (flat_index_tables(m, sigma, self.dtype, factors.device),
                       flat_index_tables(n, sigma, self.dtype, factors.device))

    def masked(self, side: int, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from ._mask_kernel import masked_factors_kernel

        return masked_factors_kernel(factors, self.tables[side][0], self.upper[side], self.lower[side],
                                     self.wraps[side], dtype)

    def grads(self, side: int, d_masked: torch.Tensor, factors: torch.Tensor, d_widths, d_locations):
        """The factors' gradient; the width and location gradients go to row ``side`` of
        ``d_widths`` / ``d_locations`` (2, K')."""
        from ._mask_kernel import side_grads_kernel

        prefix, q = self.tables[side]
        return side_grads_kernel(d_masked, factors, prefix, q, self.upper[side], self.lower[side],
                                 self.wraps[side], d_widths[side], d_locations[side])


_KERNELS_WORK = {}  # device -> whether the Triton kernels compiled and ran there


def kernels_work(device: torch.device) -> bool:
    """Whether the Triton training kernels run on ``device``: checked once per device by a tiny
    forward and backward through them (which also compiles them).  A Triton that rejects them
    costs a warning and the torch ops, not the training run."""
    key = str(device)
    if key not in _KERNELS_WORK:
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                factors = torch.randn(3, 1, 40, device=device, requires_grad=True)
                widths = torch.tensor([[0.5, 1.0, 0.0], [0.25, 0.75, 0.5]], device=device, requires_grad=True)
                locations = torch.tensor([[0.9, 0.0, 0.3], [0.1, 0.6, 0.2]], device=device, requires_grad=True)
                x = torch.randn(5, 40, device=device, requires_grad=True)
                y = _GBLRKernelFunction.apply(x, widths, locations, factors, factors.detach().clone(), None,
                                              2.0, True, False, None)
                y.sum().backward()
            _KERNELS_WORK[key] = True
        except Exception as error:  # noqa: BLE001 - any failure here means: do not use them
            warnings.warn(f"GBLR's Triton kernels failed on {device} ({type(error).__name__}: {error}); "
                          f"training with torch ops instead")
            _KERNELS_WORK[key] = False
    return _KERNELS_WORK[key]


class _GBLRKernelFunction(torch.autograd.Function):
    """The Function above with each side's masks, masked factors and gradients as one Triton
    launch each (``_mask_kernel``), the grid rows of both sides computed together, and the
    stacked (2, K') widths/locations taken and differentiated as they are: the same GEMMs and
    arithmetic in far fewer launches (GPU)."""

    @staticmethod
    def forward(ctx, x, widths, locations, row_factors, col_factors, bias, sigma, factored, recompute_inner,
                rows):
        m, n = row_factors.shape[-1], col_factors.shape[-1]
        dtype = _compute_dtype(x)
        sides = _Sides(widths, locations, m, n, sigma, row_factors, rows)
        with torch.autocast(x.device.type, enabled=False):
            Um, Vm = sides.masked(0, row_factors, dtype), sides.masked(1, col_factors, dtype)
            x2 = x.reshape(-1, n).to(dtype)
            b = bias.to(dtype) if bias is not None else None
            if factored:
                inner = x2 @ Vm.T  # (T, K' r)
                y = torch.addmm(b, inner, Um) if b is not None else inner @ Um
                kept = None if recompute_inner else inner
            else:
                W = Um.T @ Vm  # (m, n)
                y = torch.addmm(b, x2, W.T) if b is not None else x2 @ W.T
                kept = W if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x, row_factors, col_factors, kept)
        ctx.sides, ctx.factored, ctx.dtype, ctx.has_bias = sides, factored, dtype, bias is not None
        return y.reshape(*x.shape[:-1], m)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, row_factors, col_factors, kept = ctx.saved_tensors
        sides, needs, dtype = ctx.sides, ctx.needs_input_grad, ctx.dtype
        m, n = row_factors.shape[-1], col_factors.shape[-1]
        d_widths = row_factors.new_empty(2, row_factors.shape[0], dtype=sides.dtype)
        d_locations = torch.empty_like(d_widths)
        with torch.autocast(x.device.type, enabled=False):
            dy = grad_y.reshape(-1, m).to(dtype)
            x2 = x.reshape(-1, n).to(dtype)
            Vm = sides.masked(1, col_factors, dtype)
            grad_x = None
            if ctx.factored:
                Um = sides.masked(0, row_factors, dtype)
                inner = kept if kept is not None else x2 @ Vm.T  # (T, K' r)
                d_inner = dy @ Um.T
                del Um
                dUm = inner.T @ dy
                del inner, kept  # before the gradient kernel's outputs are allocated
                d_row_factors = sides.grads(0, dUm, row_factors, d_widths, d_locations)
                del dUm
                dVm = d_inner.T @ x2
                if needs[0]:
                    grad_x = d_inner @ Vm
                del d_inner, Vm
            else:
                dW = dy.T @ x2  # (m, n)
                if needs[0]:
                    grad_x = dy @ kept
                dUm = Vm @ dW.T
                del Vm, kept
                dVm = sides.masked(0, row_factors, dtype) @ dW
                del dW
                d_row_factors = sides.grads(0, dUm, row_factors, d_widths, d_locations)
                del dUm
            d_col_factors = sides.grads(1, dVm, col_factors, d_widths, d_locations)
            grad_bias = dy.sum(0) if ctx.has_bias and needs[5] else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        return (grad_x, d_widths if needs[1] else None, d_locations if needs[2] else None,
                d_row_factors if needs[3] else None, d_col_factors if needs[4] else None, grad_bias,
                None, None, None, None)


def _side_grads(held, factors, upper, lower, sigma, width_needed, location_needed, factors_needed):
    """Gradients of one side's width, location and factors.  ``held`` = [gradient of the masked
    factors (K' r, d), mask (K', d)], emptied here so that the mask is freed before the width
    backward's buffer is taken; the first is overwritten (it becomes the factors' gradient)."""
    K, r, size = factors.shape
    mask = held.pop()
    d_masked = held.pop().view(K, r, size).to(factors.dtype)
    d_mask = None
    if width_needed or location_needed:
        # in the mask's dtype (float32 for 16-bit factors: the mask gradient meets the float32
        # prefix-sum tables); a no-op cast otherwise
        dm, f = d_masked.to(mask.dtype), factors.to(mask.dtype)
        if r == 1:
            d_mask = dm[:, 0] * f[:, 0]  # (K', size)
        else:
            d_mask = torch.linalg.vecdot(dm.transpose(1, 2), f.transpose(1, 2))
        del dm, f
    # the mask is last used here (the caller drops it), before the width backward's buffer
    d_factors = d_masked.mul_(mask[:, None, :]) if factors_needed else None
    del d_masked, mask
    d_width = d_location = None
    if d_mask is not None:
        d_width, d_location = index_mask_backward(d_mask, upper, lower, size, sigma, location_needed)
    return d_width, d_location, d_factors


def gblr_linear(
    x: torch.Tensor,
    widths: torch.Tensor,
    locations: torch.Tensor,
    row_factors: torch.Tensor,
    col_factors: torch.Tensor,
    bias: Optional[torch.Tensor],
    sigma: Optional[float],
    *,
    factored: bool,
    recompute_inner: bool = False,
    wrapped: Tuple[Optional[bool], Optional[bool]] = (None, None),
    kernels: bool = True,
    rows: Optional[torch.Tensor] = None,
    masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """GBLR's y = x W^T + b with W = sum_k (row_factors_k * row_mask_k)^T (col_factors_k * col_mask_k),
    differentiable in everything.  widths/locations: (2, K') fractions (row side first), rounded
    to the grid here with a straight-through gradient; factors (K', r, out) and (K', r, in).
    ``wrapped``: whether any row / column interval covers a whole period, if the caller knows
    (None: read from the widths, one host read each; True is always correct, only slower).
    ``kernels``: each side's masks and gradients in one Triton launch where Triton runs (CUDA
    tensors, ``_mask_kernel``); False keeps the torch ops everywhere.  ``rows``: the components'
    :func:`grid_rows` (3, 2, K') if the caller has them (:func:`live_grid_rows`), for either path;
    with ``kernels`` and rows given, the caller (GBLRLinear) has found the kernels usable here.
    ``masks``: the (K', out) and (K', in) masks of these widths and locations, for the torch path
    (a frozen structure's, kept by the layer; then ``wrapped`` must be given)."""
    if kernels and (rows is not None or (triton_runs(x) and kernels_work(x.device))):
        return _GBLRKernelFunction.apply(x, widths, locations, row_factors, col_factors, bias,
                                         None if sigma is None else float(sigma), bool(factored),
                                         bool(recompute_inner), rows)
    # The Function rounds to the grid itself (``_index_rows``: round(w n) of w is round(w n) of
    # round_to_grid(w)) and returns the gradient at the grid point to w unchanged: the
    # straight-through estimator, without round_to_grid's five launches per tensor.
    return _GBLRLinearFunction.apply(
        x, widths[0], locations[0], widths[1], locations[1],
        row_factors, col_factors, bias, None if sigma is None else float(sigma),
        bool(factored), bool(recompute_inner), tuple(wrapped), rows, masks,
    )
