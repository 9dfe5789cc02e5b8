"""Block-sparse matrices multiplied from the left, for the "bsr" export plan.

:class:`BlockSparseMatrix` keeps a (K x N) matrix as its non-zero (BK x BN) blocks, column block
by column block (compressed sparse columns of blocks), and computes ``a @ B (+ bias)``:

- on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``): one Triton kernel launch for the
  whole product, ``_bsr_kernel`` (each program one output tile, walking its column
  block's non-zero blocks), optionally reading A's columns through an index (a permutation
  of A's columns without a copy);
- elsewhere: the same blocks in torch, one GEMM per column block over its gathered k ranges (the
  CPU path: correct and used as the kernel's reference, but slower than the "grouped"/"tiled"
  plans on a CPU, which is why ``export(plan="auto")`` only tries "bsr" on a GPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ._common import triton_runs

__all__ = ["BlockSparseMatrix"]



class BlockSparseMatrix(nn.Module):
    """A (K x N) matrix as its non-zero (BK x BN) blocks; ``forward(a)`` = ``a @ B``.

    ``tokens_as_n`` (Triton only): run the product transposed, the column block on the tensor
    cores' M side and A's rows on their N side -- for narrow column blocks (``_bsr_kernel``)."""

    tokens_as_n = False

    def __init__(self, dense: torch.Tensor, block: Tuple[int, int]) -> None:
        super().__init__()
        K, N = dense.shape
        BK, BN = (int(b) for b in block)
        if BK < 1 or BN < 1:
            raise ValueError(f"block sizes must be positive, got {block}")
        self.shape = (int(K), int(N))
        self.block = (BK, BN)
        kb, nb = -(-K // BK), -(-N // BN)
        padded = dense.new_zeros(kb * BK, nb * BN)
        padded[:K, :N] = dense
        tiles = padded.reshape(kb, BK, nb, BN).permute(2, 0, 1, 3)  # (nb, kb, BK, BN)
        nonzero = tiles.ne(0).flatten(2).any(-1)  # (nb, kb)
        columns, rows = nonzero.nonzero(as_tuple=True)  # column block major, k blocks ascending
        pointers = torch.zeros(nb + 1, dtype=torch.int64)
        pointers[1:] = torch.cumsum(nonzero.sum(1).cpu(), 0)
        blocks = tiles[columns, rows]  # (nnzb, BK, BN)
        # one zero block past the end, never referenced: the kernel gets a valid pointer even
        # when nothing is stored
        blocks = torch.cat([blocks, blocks.new_zeros(1, BK, BN)])
        self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("column_pointers", pointers.to(torch.int32).to(dense.device))
        self.register_buffer("block_rows", rows.to(torch.int32).contiguous())
        self._host_pointers = pointers.tolist()

    @property
    def stored_blocks(self) -> int:
        return int(self.block_rows.numel())

    def executed_macs(self) -> int:
        """Multiply-adds per row of A: every stored block in full."""
        return self.stored_blocks * self.block[0] * self.block[1]

    def to_dense(self) -> torch.Tensor:
        (K, N), (BK, BN) = self.shape, self.block
        dense = self.blocks.new_zeros(-(-K // BK) * BK, -(-N // BN) * BN)
        for j in range(len(self._host_pointers) - 1):
            for i in range(self._host_pointers[j], self._host_pointers[j + 1]):
                k = int(self.block_rows[i])
                dense[k * BK : (k + 1) * BK, j * BN : (j + 1) * BN] = self.blocks[i]
        return dense[:K, :N]

    def forward(self, a: torch.Tensor, *, index: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a[:, index] @ B + bias`` (``a`` (M, K), or (M, >= max(index) + 1) with ``index`` (K,)
        int32); written into ``out`` (M, N) when given."""
        if triton_runs(a):
            from ._bsr_kernel import block_sparse_matmul

            return block_sparse_matmul(a, self.blocks, self.column_pointers, self.block_rows,
                                       self.shape[1], index=index, bias=bias, out=out,
                                       tokens_as_n=self.tokens_as_n)
        return self._torch_matmul(a, index, bias, out)

    def _torch_matmul(self, a, index, bias, out):
        (K, N), (BK, BN) = self.shape, self.block
        if index is not None:
            a = a.index_select(1, index.long())
        kb = -(-K // BK)
        if a.shape[1] < kb * BK:  # the last k block runs past K: zero columns
            a = torch.cat([a, a.new_zeros(a.shape[0], kb * BK - a.shape[1])], 1)
        nb = len(self._host_pointers) - 1
        result = a.new_zeros(a.shape[0], nb * BN)
        offsets = torch.arange(BK, device=a.device)
        for j in range(nb):
            first, last = self._host_pointers[j], self._host_pointers[j + 1]
            if first == last:
                continue
            columns = (self.block_rows[first:last].long()[:, None] * BK + offsets).flatten()
            torch.mm(a.index_select(1, columns), self.blocks[first:last].reshape(-1, BN),
                     out=result[:, j * BN : (j + 1) * BN])
        result = result[:, :N]
        if bias is not None:
            result = result + bias
        if out is None:
            return result
        out.copy_(result)
        return out
