"""ExportedGBLR: the module that holds and runs a GBLR layer's execution plan."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .._common import triton_runs
from ._auto import _fastest
from ._bsr import BSR_BLOCK, BSR_BLOCKS, BsrPlan
from ._common import PlanCost, _Piece
from ._grouped import GroupedPlans
from ._tiled import TiledPlan

__all__ = ["ExportedGBLR", "EXPORT_PLANS", "DEFAULT_PLAN"]

EXPORT_PLANS = ("auto", "grouped", "factored", "tiled", "bsr", "exact")
# ``export()``'s plan when none is given: "auto" times the candidate plans on a calibration batch
# and keeps the fastest, so it may execute more multiply-adds than the method's count (padding,
# ``executed_flops()``); "exact" is the plan that executes exactly that count.
DEFAULT_PLAN = "auto"


def _check_sigma(layer, name: str, exact_masks: bool) -> None:
    """Refuse a GBLR layer at a finite sigma unless ``exact_masks`` (see :func:`export`)."""
    sigma = getattr(layer, "sigma", None)
    if sigma is not None and not exact_masks:
        raise ValueError(
            f"export: {name} has sigma={sigma} (Gaussian-smoothed masks), but an exported plan "
            f"runs exact boxcar masks; set its sigma to None (set_sigma(model, None)) or pass "
            f"exact_masks=True to export the exact masks"
        )


class ExportedGBLR(GroupedPlans, TiledPlan, BsrPlan, nn.Module):
    """Mask-free inference form of a GBLR layer (see the package docstring); each plan's building
    and running live in its module (:class:`GroupedPlans`, :class:`TiledPlan`, :class:`BsrPlan`)."""

    family = "gblr-exported"
    token_chunk = 1024  # rows per pass of forward (see there)

    def __init__(self, in_features: int, out_features: int, bias=None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.plan = "exact"
        self.method_flops = 0
        # stage 1: (col_begin, col_end, t_begin, t_end) on the extended input; stage 2:
        # (row_begin, row_end, t_begin, t_end) on the extended output; dense blocks:
        # (row_begin, row_end, col_begin, col_end).  Tensors live in the parameter lists.
        self.column_groups: List[Tuple[int, int, int, int]] = []
        self.row_groups: List[Tuple[int, int, int, int]] = []
        self.blocks: List[Tuple[int, int, int, int]] = []
        self.col_factors = nn.ParameterList()  # (window, rank) per column group
        self.row_factors = nn.ParameterList()  # (rank, window) per row group
        self.block_weights = nn.ParameterList()  # (h, c) per dense block
        # "tiled" plan: (axis_begin, axis_end, ((t_begin, t_end, factor_begin, factor_end), ...))
        # per tile, factors in col_factors (tile, arc) / row_factors (arc, tile)
        self.column_tiles: List[Tuple[int, int, tuple]] = []
        self.row_tiles: List[Tuple[int, int, tuple]] = []
        self.register_buffer("t_order", None)  # stage-2 order of t's columns, None = identity
        self.inner = 0  # columns of t
        # "bsr" plan: t = x @ stage1, y = t[:, t_order] @ stage2 + bias (block-sparse matrices)
        self.stage1: Optional[nn.Module] = None
        self.stage2: Optional[nn.Module] = None

    @staticmethod
    def _frozen(tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_gblr(
        cls, layer, *, plan: Optional[str] = None, cost: Optional[PlanCost] = None,
        block: Optional[int] = None, exact_masks: bool = False, name: str = "the GBLR layer",
    ) -> "ExportedGBLR":
        """Execution plan of a trained GBLR layer (``plan`` in :data:`EXPORT_PLANS`, default
        :data:`DEFAULT_PLAN`; ``block``: the "bsr" plan's block shape, (features, t columns) or
        one size for both, default :data:`BSR_BLOCK`).  A layer at a finite sigma is refused
        unless ``exact_masks`` (see :func:`export`); ``name`` is how the error names it."""
        plan = DEFAULT_PLAN if plan is None else plan
        if plan not in EXPORT_PLANS:
            raise ValueError(f"plan must be one of {EXPORT_PLANS}, got {plan!r}")
        _check_sigma(layer, name, exact_masks)
        cost = cost or PlanCost()
        bsr_block = BSR_BLOCK if block is None else block
        bsr_block = (int(bsr_block), int(bsr_block)) if isinstance(bsr_block, int) else tuple(map(int, bsr_block))
        if plan == "auto":
            candidates = [cls.from_gblr(layer, plan=p, cost=cost, exact_masks=True)
                          for p in ("grouped", "factored", "tiled")]
            if triton_runs(layer.row_factors) and layer.row_factors.is_cuda:
                candidates += [cls.from_gblr(layer, plan="bsr", block=b, exact_masks=True) for b in BSR_BLOCKS]
            return _fastest(candidates)
        m, n, r = layer.out_features, layer.in_features, layer.rank
        exported = cls(n, m, layer.bias)
        exported.plan = plan
        exported.method_flops = int(layer.flops())
        lengths = layer.interval_lengths()
        starts = layer.interval_starts()
        pieces: List[_Piece] = []
        dense_blocks: List[Tuple[int, int, torch.Tensor]] = []
        for k in layer.live_components().tolist():
            rs, h, cs, c = int(starts[0, k]), int(lengths[0, k]), int(starts[1, k]), int(lengths[1, k])
            rows = torch.arange(rs, rs + h) % m
            cols = torch.arange(cs, cs + c) % n
            U = layer.row_factors[k][:, rows].T  # (h, r)
            V = layer.col_factors[k][:, cols].T  # (c, r)
            if h * c <= r * (h + c):  # the method counts this component as a dense h x c block
                block = U @ V.T  # (h, c)
                if plan == "exact":
                    dense_blocks.append((rs, cs, block))
                    continue
                eye_like = lambda size: torch.eye(size, dtype=block.dtype, device=block.device)
                U, V = (eye_like(h), block.T) if h <= c else (block, eye_like(c))
            pieces.append(_Piece(rs, cs, U, V))
        if plan == "bsr":
            exported._build_bsr(pieces, bsr_block)
        elif plan == "tiled":
            if pieces:
                exported._build_tiled(pieces, cost)
        else:
            exported._build_grouped(pieces, dense_blocks, cost)
        return exported

    # -- running -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the plan on chunks of :attr:`token_chunk` tokens, each written into its rows of
        the output: the intermediate t of a chunk stays in cache between the stages and the
        in-place accumulations (measured: 1.3x faster than whole-batch stages for the tiled plan
        on 4096 tokens, bench/RESULTS.md).

        The plan's in-place GEMMs cannot be differentiated; an input that requires grad (an
        exported layer inside a model whose other layers train, a saliency map) goes through
        the plan's dense matrix instead: the same function, differentiable in ``x`` (the
        exported factors are frozen).

        Under autocast the plan runs in its own dtype, autocast off inside (its in-place GEMMs
        are not autocast ops): an input of another dtype is cast to it at the boundary, and
        the output is in the plan's dtype (``export(..., dtype=torch.bfloat16)`` for a bf16 plan)."""
        if torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                weight = self.to_dense()
            return nn.functional.linear(x, weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        tokens = x2.shape[0]
        if self.plan == "bsr":  # two kernel launches over the whole batch (no chunks)
            return self._run_bsr(x2).reshape(*lead, self.out_features)
        run = self._run_tiled if self.plan == "tiled" else self._run_grouped
        chunk = max(1, int(self.token_chunk))
        y = x2.new_empty(tokens, self.out_features)
        for first in range(0, tokens, chunk):
            run(x2[first : first + chunk], y[first : first + chunk])
        return y.reshape(*lead, self.out_features)

    def _start_output(self, y: torch.Tensor, begin: int = 0, end: Optional[int] = None) -> None:
        """Columns [begin, end) of ``y`` := the bias (or zero), before accumulating into them."""
        end = self.out_features if end is None else end
        if self.bias is not None:
            y[:, begin:end].copy_(self.bias[begin:end].expand(y.shape[0], end - begin))
        else:
            y[:, begin:end].zero_()

    # -- accounting ----------------------------------------------------------------------------
    def flops(self) -> int:
        """The method's multiply-adds per token (equal to the trained layer's ``flops()``)."""
        return int(self.method_flops)

    def num_params(self) -> int:
        """Scalars the method's form stores: each live component's cropped factors (r (h + c),
        or h c for one counted as a dense block -- the same sum as :meth:`flops`) plus the bias.
        The plan's tensors hold more (zero padding, see :meth:`executed_flops`)."""
        return int(self.method_flops) + (0 if self.bias is None else self.bias.numel())

    def executed_flops(self) -> int:
        """Multiply-adds per token that the plan executes, padding included (>= ``flops()``)."""
        total = sum(V.numel() for V in self.col_factors) + sum(U.numel() for U in self.row_factors)
        if self.plan == "bsr":
            total += self.stage1.executed_macs() + self.stage2.executed_macs()
        return int(total + sum(B.numel() for B in self.block_weights))

    def to_dense(self) -> torch.Tensor:
        reference = next(iter(self.parameters()), None)
        eye = torch.eye(self.in_features, dtype=None if reference is None else reference.dtype,
                        device=None if reference is None else reference.device)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).T
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, plan={self.plan}, "
            f"column_groups={len(self.column_groups)}, row_groups={len(self.row_groups)}, "
            f"column_tiles={len(self.column_tiles)}, row_tiles={len(self.row_tiles)}, blocks={len(self.blocks)}, "
            + (f"bsr_block={self.stage1.block}, " if self.stage1 is not None else "")
            + f"flops={self.flops()}, executed_flops={self.executed_flops()}"
        )
