"""Triton kernel of :class:`gsmsearch.structured._bsr_matrix.BlockSparseMatrix`: out = A @ B (+ bias)
with B stored as its non-zero (BK x BN) blocks, column block by column block.

One program computes one (BM x BN) tile of ``out``: it walks the non-zero blocks of its column
block (``column_pointers[j] .. column_pointers[j + 1]``), loads the matching (BM x BK) slice of A
(optionally through a column index, ``GATHER``: A's column ``index[k]`` plays column k, so a
permutation of A's columns costs no copy) and accumulates ``tl.dot`` in float32.  Programs are
launched column block fastest: the programs running together work on the same few token
blocks, so each (BM x K) row band of A is read from memory about once and then from L2 by every
column block that needs it (A -- 8192 tokens x 4096 features in bf16, 64 MiB -- does not fit
in L2 whole; read token block fastest, narrow column blocks would re-read it from memory once per
column block), while the stored blocks (a fraction of one weight matrix) stay in L2 throughout.

Imported only where it runs: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
(the interpreter the tests use, ``tests/structured/test_bsr_matrix.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import TRITON_FP_FUSION as FP_FUSION

__all__ = ["block_sparse_matmul"]


@triton.jit
def _kernel(a_ptr, index_ptr, blocks_ptr, pointers_ptr, rows_ptr, bias_ptr, out_ptr,
            M, K, N, stride_am, stride_ak, stride_om, stride_on,
            GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, TOKENS_AS_N: tl.constexpr,
            BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """``TOKENS_AS_N``: the same tile computed transposed, out^T = B^T A^T, so the column block
    (narrow, BN) is the tensor cores' M side and the tokens (BM) their N side: a tensor-core
    instruction's throughput grows with its N, so a narrow column block runs better as M."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rn = tl.arange(0, BN)
    row_ok = rm < M
    if TOKENS_AS_N:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    first = tl.load(pointers_ptr + pid_n)
    last = tl.load(pointers_ptr + pid_n + 1)
    for i in range(first, last):
        kb = tl.load(rows_ptr + i)
        cols = kb * BK + rk
        col_ok = cols < K
        if GATHER:
            cols = tl.load(index_ptr + cols, mask=col_ok, other=0)
        block = blocks_ptr + i * (BK * BN)
        if TOKENS_AS_N:
            a_t = tl.load(a_ptr + cols[:, None] * stride_ak + rm[None, :] * stride_am,
                          mask=col_ok[:, None] & row_ok[None, :], other=0.0)  # (BK, BM)
            acc += tl.dot(tl.load(block + rk[None, :] * BN + rn[:, None]), a_t)  # (BN, BK) @ (BK, BM)
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + cols[None, :] * stride_ak,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BM, BK)
            acc += tl.dot(a, tl.load(block + rk[:, None] * BN + rn[None, :]))  # (BM, BK) @ (BK, BN)
    cn = pid_n * BN + rn
    n_ok = cn < N
    if TOKENS_AS_N:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + cn[:, None] * stride_on + rm[None, :] * stride_om,
                 acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & row_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + cn[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def block_sparse_matmul(a: torch.Tensor, blocks: torch.Tensor, column_pointers: torch.Tensor,
                        block_rows: torch.Tensor, n: int, *, index: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                        block_m: Optional[int] = None, num_warps: Optional[int] = None,
                        num_stages: int = 3, tokens_as_n: bool = False) -> torch.Tensor:
    """out (M, n) = A[:, index] @ B + bias, B the (K, n) block-sparse matrix given by ``blocks``
    (nnzb, BK, BN), ``column_pointers`` (n / BN + 1,) and ``block_rows`` (nnzb,) (int32).
    ``a`` (M, K) may be any strided view; ``index`` (K,) int32 gathers A's columns.
    ``tokens_as_n``: compute it transposed (see :func:`_kernel`)."""
    M, K = a.shape if index is None else (a.shape[0], index.shape[0])
    _, BK, BN = blocks.shape
    if out is None:
        out = a.new_empty(M, n)
    BM = block_m or (128 if M >= 128 else max(16, triton.next_power_of_2(M)))
    if num_warps is None:  # a 128 x 128 float32 accumulator wants two warp groups
        num_warps = 8 if BM * BN >= 128 * 128 else 4
    grid = (column_pointers.numel() - 1, triton.cdiv(M, BM))  # column blocks fastest
    dummy = blocks  # never read when its flag is off
    _kernel[grid](a, index if index is not None else dummy, blocks, column_pointers, block_rows,
                  bias if bias is not None else dummy, out,
                  M, K, n, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                  GATHER=index is not None, HAS_BIAS=bias is not None, TOKENS_AS_N=bool(tokens_as_n),
                  BM=BM, BK=BK, BN=BN, num_warps=num_warps, num_stages=num_stages,
                  enable_fp_fusion=FP_FUSION)
    return out
