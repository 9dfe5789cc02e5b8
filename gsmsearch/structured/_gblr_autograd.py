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

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._block_sparse import triton_runs
from ._mask import _index_rows, flat_index_tables, index_mask_backward, index_mask_forward

__all__ = ["gblr_linear", "masked_factors"]


def masked_factors(factors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K', r, d) factors times (K', d) masks, flattened to (K' r, d)."""
    return (factors * mask[:, None, :]).reshape(-1, factors.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Side:
    """One side's grid rows for the Triton kernels (``_mask_kernel``): computed once in the
    forward and kept (K'-sized) for the backward."""

    def __init__(self, width, location, size: int, sigma: Optional[float], factors: torch.Tensor):
        self.upper, self.lower, wraps = _index_rows(width, location, size)
        self.prefix, self.q = flat_index_tables(size, sigma, factors.dtype, factors.device)
        self.wraps = wraps.to(factors.dtype)

    def masked(self, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from ._mask_kernel import masked_factors_kernel

        return masked_factors_kernel(factors, self.prefix, self.upper, self.lower, self.wraps, dtype)

    def grads(self, d_masked: torch.Tensor, factors: torch.Tensor, width_needed, location_needed,
              factors_needed):
        from ._mask_kernel import side_grads_kernel

        d_factors, d_width, d_location = side_grads_kernel(
            d_masked, factors, self.prefix, self.q, self.upper, self.lower, self.wraps)
        return (d_width if width_needed else None, d_location if location_needed else None,
                d_factors if factors_needed else None)


class _GBLRLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_width, row_location, col_width, col_location, row_factors, col_factors,
                bias, sigma, factored, recompute_inner, wrapped, kernels):
        m, n = row_factors.shape[-1], col_factors.shape[-1]
        dtype = _compute_dtype(x)
        if kernels and triton_runs(x):
            return _forward_kernels(ctx, x, row_width, row_location, col_width, col_location,
                                    row_factors, col_factors, bias, sigma, factored, recompute_inner, dtype)
        ctx.sides = None
        with torch.autocast(x.device.type, enabled=False):
            row_mask, _, _, row_wrapped = index_mask_forward(row_width, row_location, m, sigma, wrapped[0])
            col_mask, _, _, col_wrapped = index_mask_forward(col_width, col_location, n, sigma, wrapped[1])
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
        return y.reshape(*x.shape[:-1], m)

    @staticmethod
    @once_differentiable  # second derivatives (create_graph=True) raise instead of being wrong
    def backward(ctx, grad_y):
        if ctx.sides is not None:
            return _backward_kernels(ctx, grad_y)
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
            col_mask, col_upper, col_lower, _ = index_mask_forward(col_width, col_location, n, sigma, col_wrapped)
            Vm = masked_factors(col_factors, col_mask).to(dtype)
            grad_x = None
            if ctx.factored:
                row_mask, row_upper, row_lower, _ = index_mask_forward(row_width, row_location, m, sigma, row_wrapped)
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
                row_mask, row_upper, row_lower, _ = index_mask_forward(row_width, row_location, m, sigma, row_wrapped)
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
                d_col_factors, grad_bias, None, None, None, None, None)


def _forward_kernels(ctx, x, row_width, row_location, col_width, col_location, row_factors,
                     col_factors, bias, sigma, factored, recompute_inner, dtype):
    """The forward with each side's masks and masked factors in one Triton launch (GPU)."""
    m, n = row_factors.shape[-1], col_factors.shape[-1]
    rows = _Side(row_width, row_location, m, sigma, row_factors)
    cols = _Side(col_width, col_location, n, sigma, col_factors)
    with torch.autocast(x.device.type, enabled=False):
        Um, Vm = rows.masked(row_factors, dtype), cols.masked(col_factors, dtype)
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
    ctx.sides, ctx.factored, ctx.dtype, ctx.has_bias = (rows, cols), factored, dtype, bias is not None
    return y.reshape(*x.shape[:-1], m)


def _backward_kernels(ctx, grad_y):
    """The backward of :func:`_forward_kernels`: the torch path's GEMMs, each side's mask
    rebuild and gradients in one Triton launch each."""
    x, row_factors, col_factors, kept = ctx.saved_tensors
    rows, cols = ctx.sides
    needs = ctx.needs_input_grad
    m, n = row_factors.shape[-1], col_factors.shape[-1]
    dtype = ctx.dtype
    with torch.autocast(x.device.type, enabled=False):
        dy = grad_y.reshape(-1, m).to(dtype)
        x2 = x.reshape(-1, n).to(dtype)
        Vm = cols.masked(col_factors, dtype)
        grad_x = None
        if ctx.factored:
            Um = rows.masked(row_factors, dtype)
            inner = kept if kept is not None else x2 @ Vm.T  # (T, K' r)
            d_inner = dy @ Um.T
            del Um
            row_grads = rows.grads(inner.T @ dy, row_factors, *needs[1:3], needs[5])
            del inner, kept
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
            dVm = rows.masked(row_factors, dtype) @ dW
            del dW
            row_grads = rows.grads(dUm, row_factors, *needs[1:3], needs[5])
            del dUm
        col_grads = cols.grads(dVm, col_factors, *needs[3:5], needs[6])
        grad_bias = dy.sum(0) if ctx.has_bias and needs[7] else None
    if grad_x is not None:
        grad_x = grad_x.reshape(x.shape).to(x.dtype)
    (d_row_width, d_row_location, d_row_factors), (d_col_width, d_col_location, d_col_factors) = row_grads, col_grads
    return (grad_x, d_row_width, d_row_location, d_col_width, d_col_location, d_row_factors,
            d_col_factors, grad_bias, None, None, None, None, None)


def _side_grads(held, factors, upper, lower, sigma, width_needed, location_needed, factors_needed):
    """Gradients of one side's width, location and factors.  ``held`` = [gradient of the masked
    factors (K' r, d), mask (K', d)], emptied here so that the mask is freed before the width
    backward's buffer is taken; the first is overwritten (it becomes the factors' gradient)."""
    K, r, size = factors.shape
    mask = held.pop()
    d_masked = held.pop().view(K, r, size).to(factors.dtype)
    d_mask = None
    if width_needed or location_needed:
        if r == 1:
            d_mask = d_masked[:, 0] * factors[:, 0]  # (K', size)
        else:
            d_mask = torch.linalg.vecdot(d_masked.transpose(1, 2), factors.transpose(1, 2))
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
) -> torch.Tensor:
    """GBLR's y = x W^T + b with W = sum_k (row_factors_k * row_mask_k)^T (col_factors_k * col_mask_k),
    differentiable in everything.  widths/locations: (2, K') fractions (row side first), rounded
    to the grid here with a straight-through gradient; factors (K', r, out) and (K', r, in).
    ``wrapped``: whether any row / column interval covers a whole period, if the caller knows
    (None: read from the widths, one host read each; True is always correct, only slower).
    ``kernels``: each side's masks and gradients in one Triton launch where Triton runs (CUDA
    tensors, ``_mask_kernel``); False keeps the torch ops everywhere."""
    # The Function rounds to the grid itself (``_index_rows``: round(w n) of w is round(w n) of
    # round_to_grid(w)) and returns the gradient at the grid point to w unchanged: the
    # straight-through estimator, without round_to_grid's five launches per tensor.
    return _GBLRLinearFunction.apply(
        x, widths[0], locations[0], widths[1], locations[1],
        row_factors, col_factors, bias, None if sigma is None else float(sigma),
        bool(factored), bool(recompute_inner), tuple(wrapped), bool(kernels),
    )
