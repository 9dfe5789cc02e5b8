"""MonarchLinear: two block-diagonal factors with a stride permutation between them
(Dao et al. 2022, "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
M = P L P^T R, in the general rectangular form of the authors' ``MonarchLinear``).

With b = ``num_blocks``: p = ceil(in / b), s = ceil(out / b), q = max(p, s).
- the input is zero-padded to b*p (when b does not divide in) and split into b contiguous blocks;
- R: block j maps its p inputs to q intermediates, ``factor1`` (b, q, p);
- stride permutation: the b*q intermediates, flat index f = j*q + t, are read as a (q, b) grid,
  so second-stage block i takes the intermediates f with f % b == i (position a = f // b);
- L: block i maps its q intermediates to s outputs, ``factor2`` (b, s, q);
- output position of block i's a'-th output is a'*b + i (the final P); the padded output b*s is
  cut to ``out``.
Cost per token: ``b*q*p + b*s*q`` multiply-adds, the two block-diagonal factors as executed
(padding included).  For a square d x d layer with b | d this is 2 d^2 / b.

Output block i and input block j are coupled through the intermediates f = j*q + t with
f % b == i, about q / b of them, so M restricted to (rows of block i, columns of block j) has
rank |T_ij| and these rank-|T_ij| pieces have disjoint parameters: :meth:`from_dense` projects
each one with a truncated SVD, the Frobenius-optimal Monarch approximation for the given b.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._base import StructuredLinear, register_family
from ._common import check_dense, check_int, finish_from_dense, fits, init_bias_like_linear, \
    no_fit_error

__all__ = ["MonarchLinear"]


def monarch_shapes(in_features: int, out_features: int, num_blocks: int) -> Tuple[int, int, int]:
    """(p, q, s): input, intermediate and output block sizes for ``num_blocks`` blocks."""
    p = math.ceil(in_features / num_blocks)
    s = math.ceil(out_features / num_blocks)
    return p, max(p, s), s


def monarch_flops(in_features: int, out_features: int, num_blocks: int) -> int:
    p, q, s = monarch_shapes(in_features, out_features, num_blocks)
    return num_blocks * q * (p + s)


def monarch_num_blocks(in_features: int, out_features: int, budget: float,
                       num_blocks: Optional[int] = None) -> int:
    """The number of blocks ``MonarchLinear.from_dense`` builds at ``budget``: ``num_blocks``
    when given (refused when it does not fit), else the b in [1, min(in, out)] with the largest
    cost within ``budget`` (ties: the smaller b)."""
    most = min(in_features, out_features)
    if num_blocks is None:
        costs = [(monarch_flops(in_features, out_features, b), -b) for b in range(1, most + 1)]
        fitting = [c for c in costs if fits(c[0], budget, in_features, out_features)]
        if not fitting:
            cheapest, b = min(costs)
            raise no_fit_error("monarch", budget, in_features, out_features, cheapest,
                               f"layer (num_blocks={-b})")
        return -max(fitting)[1]
    num_blocks = check_int("num_blocks", num_blocks, 1, most)
    cost = monarch_flops(in_features, out_features, num_blocks)
    if not fits(cost, budget, in_features, out_features):
        raise ValueError(f"num_blocks={num_blocks} costs {cost} multiply-adds, more than "
                         f"budget={budget} of {out_features}x{in_features} allows")
    return num_blocks


@register_family("monarch")
class MonarchLinear(StructuredLinear):
    """Monarch linear layer (see the module docstring for the exact layout).

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        num_blocks: b, in [1, min(in, out)]; in and out are zero-padded to multiples of b.
        bias: learn an additive bias.

    Init: factor1 ~ N(0, 1/p), factor2 ~ N(0, 1/(3 q)), so rows of M have expected squared norm
    about 1/3 (a little less when the input is padded), as under nn.Linear's default init.
    """

    def __init__(self, in_features: int, out_features: int, *, num_blocks: int,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.num_blocks = check_int("num_blocks", num_blocks, 1,
                                    min(self.in_features, self.out_features),
                                    context=" (min(in_features, out_features))")
        b = self.num_blocks
        p, q, s = monarch_shapes(self.in_features, self.out_features, b)
        self.in_block, self.mid_block, self.out_block = p, q, s
        self.factor1 = nn.Parameter(torch.empty(b, q, p))   # R: block j, (q x p)
        self.factor2 = nn.Parameter(torch.empty(b, s, q))   # L: block i, (s x q)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.factor1, std=self.in_block ** -0.5)
        nn.init.normal_(self.factor2, std=(3 * self.mid_block) ** -0.5)
        init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two ``bmm`` over the blocks (batch = block, rows = tokens); the stride permutation
        between them is one ``permute`` copy (a 4-d view when b divides q)."""
        b, q, p = self.factor1.shape
        s = self.out_block
        lead = x.shape[:-1]
        if b * p != self.in_features:
            x = F.pad(x, (0, b * p - self.in_features))
        x = x.reshape(-1, b, p).transpose(0, 1)                    # (b, T, p), a strided view
        z = torch.bmm(x, self.factor1.transpose(1, 2))             # (b, T, q): block j, flat j*q + t
        tokens = z.shape[1]
        if q % b == 0:  # t = c*b + i, so flat j*q + t = (j*q/b + c)*b + i: a = j*q/b + c
            z = z.view(b, tokens, q // b, b).permute(3, 1, 0, 2).reshape(b, tokens, q)
        else:
            z = z.transpose(0, 1).reshape(tokens, q, b).permute(2, 0, 1)  # [i, T, a] = flat a*b + i
        y = torch.bmm(z, self.factor2.transpose(1, 2))             # (b, T, s): block i
        y = y.permute(1, 2, 0).reshape(*lead, s * b)               # position a'*b + i
        return self._add_bias(y[..., : self.out_features])

    def to_dense(self) -> torch.Tensor:
        """Reference: P_out L_bd P_mid R_bd built explicitly (block_diag + index permutations)."""
        b, q, p = self.factor1.shape
        s = self.out_block
        right = torch.block_diag(*self.factor1.unbind(0))         # (b*q, b*p), rows f = j*q + t
        left = torch.block_diag(*self.factor2.unbind(0))          # (b*s, b*q), cols i*q + a
        i, a = torch.meshgrid(torch.arange(b), torch.arange(q), indexing="ij")
        mid_source = (a * b + i).reshape(-1)                      # L input i*q + a <- z_flat[a*b + i]
        i, a_out = torch.meshgrid(torch.arange(b), torch.arange(s), indexing="ij")
        out_position = (a_out * b + i).reshape(-1)                # L output i*s + a' -> a'*b + i
        out_source = torch.empty_like(out_position)
        out_source[out_position] = torch.arange(b * s)
        dense = left @ right[mid_source.to(right.device)]         # (b*s, b*p), L-block row order
        dense = dense[out_source.to(dense.device)]                # output order
        return dense[: self.out_features, : self.in_features]

    def flops(self) -> int:
        b, q, p = self.factor1.shape
        return b * q * p + b * self.out_block * q

    def structure_summary(self) -> dict:
        return {**super().structure_summary(), "num_blocks": self.num_blocks,
                "block_shapes": [self.in_block, self.mid_block, self.out_block]}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   budget: float, num_blocks: Optional[int] = None) -> "MonarchLinear":
        """Monarch projection of ``weight``.  ``num_blocks`` defaults to the b in
        [1, min(in, out)] with the largest cost within ``budget`` (ties: the smaller b)."""
        budget = cls._check_budget(budget)
        fitted = check_dense(weight, bias)
        out_features, in_features = fitted.shape
        num_blocks = monarch_num_blocks(in_features, out_features, budget, num_blocks)
        layer = cls(in_features, out_features, num_blocks=num_blocks, bias=bias is not None)
        b, p, q, s = num_blocks, layer.in_block, layer.mid_block, layer.out_block
        padded = F.pad(fitted, (0, b * p - in_features, 0, b * s - out_features))  # (b*s, b*p)
        # block (i, j): rows a'*b + i, columns j*p + u
        blocks = padded.reshape(s, b, b, p).permute(1, 2, 0, 3)    # (i, j, s, p)
        u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)  # (b,b,s,k), (b,b,k), (b,b,k,p)
        k = sv.shape[-1]
        f = torch.arange(b * q)
        j, t = f // q, f % q            # first-stage block and row of intermediate f
        i, a = f % b, f // b            # second-stage block and column of intermediate f
        n = t // b                      # rank index of f within its block pair (i, j)
        valid = n < k
        n = n.clamp(max=k - 1)
        root = sv[i, j, n].clamp_min(0).sqrt() * valid              # (b*q,)
        factor1 = torch.zeros(b, q, p, dtype=fitted.dtype)
        factor2 = torch.zeros(b, s, q, dtype=fitted.dtype)
        factor1[j, t, :] = vh[i, j, n, :] * root[:, None]
        factor2[i, :, a] = u[i, j, :, n] * root[:, None]
        with torch.no_grad():
            layer.factor1.copy_(factor1)
            layer.factor2.copy_(factor2)
        return finish_from_dense(layer, weight, bias)
