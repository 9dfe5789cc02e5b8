"""Triton kernels of GBLR's training step on a GPU: each side's masks, masked factors and their
gradients in one launch each, where the torch path (``_gblr_autograd``) takes a dozen launches
per side.  At a GPU's speed the GEMMs of a 768 -> 3072 layer over 8192 tokens take a few hundred
microseconds, about what launching the torch path's elementwise ops costs.

Both kernels read the index-space tables of ``_mask._index_tables`` (one flat table per side:
row r, column i of the Hankel view is ``table[r + i]``) at the rows ``upper``/``lower`` of each
component, plus its whole periods ``wraps`` (``_mask._index_rows``):

    mask[k, i]   = P[upper_k + i] - P[lower_k + i] + wraps_k
    masked[k r + j, i] = factors[k, j, i] * mask[k, i]                         (forward)

    d_factors[k, j, i] = d_masked[k r + j, i] * mask[k, i]
    d_mask[k, i]       = sum_j d_masked[k r + j, i] * factors[k, j, i]
    d_width[k]         = sum_i d_mask[k, i] q[lower_k + i]
    d_location[k]      = d_width[k] - sum_i d_mask[k, i] q[upper_k + i]              (backward)

the same arithmetic, in the same order, as the torch path (``index_mask_forward``,
``masked_factors``, ``_side_grads``, ``index_mask_backward``).  The backward runs one program per
component over the whole side (no atomics: deterministic).  Imported only where it runs (CUDA, or
the CPU interpreter under ``TRITON_INTERPRET=1`` that the tests use).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_FP_FUSION as FP_FUSION

__all__ = ["masked_factors_kernel", "side_grads_kernel"]

BLOCK = 1024  # elements of one side per program step


@triton.jit
def _masked_kernel(factors_ptr, prefix_ptr, upper_ptr, lower_ptr, wraps_ptr, out_ptr, R, D,
                   BD: tl.constexpr):
    k = tl.program_id(0)
    i = tl.program_id(1) * BD + tl.arange(0, BD)
    ok = i < D
    up = tl.load(upper_ptr + k)
    lo = tl.load(lower_ptr + k)
    mask = tl.load(prefix_ptr + up + i, mask=ok, other=0.0) - tl.load(prefix_ptr + lo + i, mask=ok, other=0.0)
    mask += tl.load(wraps_ptr + k)
    for j in range(R):
        row = (k * R + j) * D
        f = tl.load(factors_ptr + row + i, mask=ok, other=0.0)
        tl.store(out_ptr + row + i, (f * mask).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _side_grads_kernel(d_masked_ptr, factors_ptr, prefix_ptr, q_ptr, upper_ptr, lower_ptr, wraps_ptr,
                       d_factors_ptr, d_width_ptr, d_location_ptr, R, D, BD: tl.constexpr):
    k = tl.program_id(0)
    up = tl.load(upper_ptr + k)
    lo = tl.load(lower_ptr + k)
    wr = tl.load(wraps_ptr + k)
    acc_type = q_ptr.dtype.element_ty  # the tables' dtype: float32 for 16-bit factors
    at_end = tl.zeros((BD,), dtype=acc_type)
    at_start = tl.zeros((BD,), dtype=acc_type)
    for first in range(0, D, BD):
        i = first + tl.arange(0, BD)
        ok = i < D
        mask = tl.load(prefix_ptr + up + i, mask=ok, other=0.0) - tl.load(prefix_ptr + lo + i, mask=ok, other=0.0)
        mask += wr
        d_mask = tl.zeros((BD,), dtype=acc_type)
        for j in range(R):
            row = (k * R + j) * D
            dm = tl.load(d_masked_ptr + row + i, mask=ok, other=0.0).to(acc_type)
            f = tl.load(factors_ptr + row + i, mask=ok, other=0.0)
            tl.store(d_factors_ptr + row + i, dm * mask, mask=ok)
            d_mask += dm * f
        at_end += d_mask * tl.load(q_ptr + lo + i, mask=ok, other=0.0)
        at_start += d_mask * tl.load(q_ptr + up + i, mask=ok, other=0.0)
    end = tl.sum(at_end, axis=0)
    tl.store(d_width_ptr + k, end)
    tl.store(d_location_ptr + k, end - tl.sum(at_start, axis=0))


def masked_factors_kernel(factors: torch.Tensor, prefix: torch.Tensor, upper: torch.Tensor,
                          lower: torch.Tensor, wraps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K', r, d) factors times their masks, as (K' r, d) in ``dtype``; ``prefix`` the flat table,
    ``upper``/``lower`` (K',) its rows, ``wraps`` (K',) whole periods in the table's dtype."""
    K, R, D = factors.shape
    out = torch.empty(K * R, D, dtype=dtype, device=factors.device)
    if K:
        block = min(BLOCK, triton.next_power_of_2(D))
        _masked_kernel[(K, triton.cdiv(D, block))](factors.contiguous(), prefix, upper, lower, wraps,
                                                   out, R, D, BD=block, enable_fp_fusion=FP_FUSION)
    return out


def side_grads_kernel(d_masked: torch.Tensor, factors: torch.Tensor, prefix: torch.Tensor, q: torch.Tensor,
                      upper: torch.Tensor, lower: torch.Tensor, wraps: torch.Tensor,
                      d_width: torch.Tensor, d_location: torch.Tensor) -> torch.Tensor:
    """d_factors (K', r, d) in the factors' dtype, from the gradient of the masked factors
    (K' r, d) in any dtype; the width and location gradients are written to ``d_width`` and
    ``d_location`` (K',), contiguous, the tables' dtype (the factors' dtype, or float32 where the
    factors are 16-bit: accumulated in float32 either way)."""
    K, R, D = factors.shape
    d_factors = torch.empty_like(factors)
    if K:
        block = min(BLOCK, triton.next_power_of_2(D))
        _side_grads_kernel[(K,)](d_masked.contiguous(), factors.contiguous(), prefix, q, upper, lower,
                                 wraps, d_factors, d_width, d_location, R, D, BD=block,
                                 enable_fp_fusion=FP_FUSION)
    return d_factors
