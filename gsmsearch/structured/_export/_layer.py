"""Export: turn trained structured layers into inference modules that compute no masks.

For a GBLR layer, :class:`ExportedGBLR` keeps only live components (both intervals non-empty),
crops each to its intervals and runs them as an execution plan of two grouped stages:

    stage 1 (columns):  t[:, group]   = x[:, window] @ V_group        one GEMM per column group
    stage 2 (rows):     y[:, window] += t[:, group'] @ U_group'       one GEMM per row group

A group is a run of components, sorted by interval start, whose factors are zero-padded to the
union of their intervals (its window).  A window that wraps past the end runs as two slices of the
same GEMM (no gathers, no copies of x); between the stages, one column permutation of t (skipped
when the two orders agree).  GEMMs read and write strided slices in place (``addmm(out=...)``).
Plans:
- ``"grouped"``: the run boundaries minimise a measured cost model by dynamic programming over
  the sorted components (per GEMM: window x effective rank + a fixed per-call cost, see
  :class:`PlanCost`), within classes of similar interval length (so the few long components
  of a greedy fit do not pad the many short ones between them to the whole axis);
  stage-1 ranks below 16 are zero-padded to 16 (as fast, and counted).
  Small dense-rule components (h c <= r (h + c)) become factored pieces (their block times an
  identity), so they join groups too.
- ``"factored"``: every live component in one group over the whole axis on both sides (the
  trained layer's own factored form, cropped to live components): two GEMMs, no slicing.
- ``"tiled"``: the dual of grouping: each *axis* is cut into tiles (64..256 elements, chosen per
  stage by the cost model) and each tile runs one GEMM over the components that touch it.  The
  components are ordered by the cyclic centre of their interval, so those touching a tile form a
  short cyclic arc of t's columns (padded with the few in between that do not touch it):

      stage 1:  t[:, arc(tile)]  += x[:, tile] @ V_tile      (arc x tile, accumulated)
      stage 2:  y[:, tile]       += t'[:, arc'(tile)] @ U_tile   (each output tile written once)

  with one column permutation t -> t' between the stage orders.  On structures of many
  mid-width components (a learned layer at f = 0.3: 256 components of 40-80% width) it executes
  about 0.36 of the dense multiply-adds where the factored plan executes 0.5.
- ``"bsr"``: t's columns laid out per stage in the order that stores the fewest blocks (the
  tiled plan's cyclic-centre order, the grouped plan's runs, or by length class first), as two
  block-sparse matrices of (block x block) tiles, each stage one Triton kernel launch on a GPU
  (:class:`~gsmsearch.structured._bsr_matrix.BlockSparseMatrix`; the stage-2 kernel reads t
  through the permutation, so t' is never written).  On a CPU it runs the same blocks in torch:
  correct, slower than "tiled" there.
- ``"auto"`` (``export()``'s default, see :data:`DEFAULT_PLAN`): builds ``"grouped"``,
  ``"factored"`` and ``"tiled"`` (and on a GPU with Triton, ``"bsr"`` at each of
  :data:`BSR_BLOCKS`), times them on a calibration batch and keeps the fastest (the cost model
  alone misjudges strided slices and the permutation on learned structures; timing does not).
- ``"exact"``: only components with identical intervals share a GEMM and small components run
  as dense blocks, so the plan executes exactly the method's count
  (``executed_flops() == flops()``).

:meth:`ExportedGBLR.flops` is the method's count (equal to the trained layer's ``flops()``);
:meth:`ExportedGBLR.executed_flops` is what the plan really runs, padding included.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ._base import StructuredLinear
from ._bsr_matrix import triton_runs

__all__ = ["ExportedGBLR", "PlanCost", "export", "EXPORT_PLANS"]

EXPORT_PLANS = ("auto", "grouped", "factored", "tiled", "bsr", "exact")
TILE_SIZES = (64, 128, 256)  # candidate tile lengths of the "tiled" plan
# "bsr" block shapes, (along the features, along t's columns): what "auto" tries on a GPU, and
# the default.  t's side is short so that structures of few columns (a low-rank-like layer) do
# not pad t to a whole feature-sized block.
BSR_BLOCKS = ((64, 32), (128, 32), (128, 64), (128, 128))
BSR_BLOCK = (128, 32)
# ``export()``'s plan when none is given: "auto" times the candidate plans on a calibration batch
# and keeps the fastest, so it may execute more multiply-adds than the method's count (padding,
# ``executed_flops()``); "exact" is the plan that executes exactly that count.
DEFAULT_PLAN = "auto"
CALIBRATION_TOKENS = 2048  # rows of the calibration batch "auto" times the candidate plans on


@dataclass(frozen=True)
class PlanCost:
    """Cost model of the grouped plan, in multiply-adds per token.

    A GEMM of either stage, (tokens x window) by (window x rank) or (tokens x rank) by
    (rank x window) accumulated into the output, costs ``window * (rank + rank_offset)``: narrow
    GEMMs run far below peak (stage 1) or are bound by the read-modify-write of the output window
    (stage 2); fitting single-core fp32 MKL times at rank 16..256 gives an offset of about 32.
    Every GEMM call adds ``gemm_overhead_us * macs_per_us / tokens`` (about 35 GMAC/s, 20-30 us
    per call from Python); a window that wraps past the end runs as two calls.  Stage-1 ranks
    below ``min_rank`` are zero-padded to it (no slower, and the padding is counted).
    """

    tokens: int = 4096
    gemm_overhead_us: float = 25.0
    macs_per_us: float = 35_000.0
    rank_offset: int = 32
    min_rank: int = 16

    def overhead(self) -> float:
        return self.gemm_overhead_us * self.macs_per_us / max(1, self.tokens)


@dataclass
class _Piece:
    """One factored piece: rows [row_start, row_start + h), cols [col_start, col_start + c),
    cyclic; U (h, rho), V (c, rho); ``method_cost`` is the method's count for its component."""

    row_start: int
    col_start: int
    U: torch.Tensor
    V: torch.Tensor

    @property
    def h(self) -> int:
        return int(self.U.shape[0])

    @property
    def c(self) -> int:
        return int(self.V.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


def _segment_runs(starts: np.ndarray, ends: np.ndarray, ranks: np.ndarray, overhead: float,
                  rank_offset: float, min_rank: float, size: int):
    """Partition components into runs of the (start, end)-sorted order minimising
    sum_runs min(max end - first start, size) * max(sum rank + rank_offset, min_rank) + overhead
    (x 2 when the window wraps past ``size``), by dynamic programming (O(K^2), vectorised).
    Returns (list of index arrays into the inputs in sorted order, total cost)."""
    order = np.lexsort((ends, starts))
    s, e, r = starts[order], ends[order], ranks[order].astype(np.float64)
    count = len(order)
    if count == 0:
        return [], 0.0
    csum = np.concatenate([[0.0], np.cumsum(r)])
    best = np.zeros(count + 1)
    choice = np.zeros(count + 1, dtype=np.int64)
    for j in range(1, count + 1):
        end_max = np.maximum.accumulate(e[:j][::-1])[::-1]  # end_max[i] = max(e[i:j])
        rank = csum[j] - csum[:j]
        full = end_max - s[:j] >= size  # a window as long as the axis runs as the whole axis
        calls = np.where((end_max > size) & ~full, 2.0, 1.0)
        window = np.minimum(end_max - s[:j], size)
        cost = best[:j] + window * np.maximum(rank + rank_offset, min_rank) + overhead * calls
        i = int(np.argmin(cost))
        best[j], choice[j] = cost[i], i
    runs, j = [], count
    while j > 0:
        i = int(choice[j])
        runs.append(order[i:j])
        j = i
    return runs[::-1], float(best[count])


def _length_class_runs(starts: np.ndarray, ends: np.ndarray, ranks: np.ndarray, overhead: float,
                       rank_offset: float, min_rank: float, size: int):
    """Like :func:`_segment_runs`, but runs may interleave: a run is contiguous in start order
    only among components of similar length.  The start-ordered DP alone cannot keep long
    components out of the windows of the short ones between them (a long component starting
    at 100 and one at 130 share a run only with every short one starting in between), so a
    structure of a few long and many short components (a greedy fit of a real weight) would
    pad its short ones to the whole axis.  Components are split into classes by octave of length,
    each class is partitioned by the DP, and adjacent classes are merged while that lowers the
    modelled cost.  Returns (list of index arrays into the inputs, total cost)."""
    lengths = np.minimum(ends - starts, size)
    octave = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    members = [np.flatnonzero(octave == c) for c in np.unique(octave)]
    solved = {}  # (first, last + 1) octave class -> runs and cost of those classes together

    def solve(first: int, stop: int):
        if (first, stop) not in solved:
            union = np.concatenate(members[first:stop])
            runs, cost = _segment_runs(starts[union], ends[union], ranks[union], overhead,
                                       rank_offset, min_rank, size)
            solved[first, stop] = ([union[run] for run in runs], cost)
        return solved[first, stop]

    classes = [(c, c + 1) for c in range(len(members))]  # merged classes: ranges of octaves
    while len(classes) > 1:
        best = None
        for i in range(len(classes) - 1):
            (a, _), (_, b) = classes[i], classes[i + 1]
            gain = solve(*classes[i])[1] + solve(*classes[i + 1])[1] - solve(a, b)[1]
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, i, (a, b))
        if best is None:
            break
        _, i, merged = best
        classes[i : i + 2] = [merged]
    total = float(sum(solve(*c)[1] for c in classes))
    if len(classes) > 1:  # greedy merging can stop short of one class: keep the better of the two
        single = solve(0, len(members))
        if single[1] <= total:
            return single
    return [run for c in classes for run in solve(*c)[0]], total


def _slices(begin: int, end: int, size: int):
    """A window [begin, end) with end possibly past ``size`` as (array slice, window slice) pairs."""
    if end <= size:
        return ((begin, end, 0, end - begin),)
    return ((begin, size, 0, size - begin), (0, end - size, size - begin, end - begin))


def _window(starts: np.ndarray, ends: np.ndarray, size: int) -> Tuple[int, int]:
    """A run's window [begin, end): the union of its intervals, or the whole axis [0, size)."""
    begin, end = int(starts.min()), int(ends.max())
    return (0, size) if end - begin >= size else (begin, end)


def _positions(start: int, length: int, begin: int, end: int, size: int) -> torch.Tensor:
    """Offsets of a cyclic interval inside the window [begin, end) (cyclic when it is the axis)."""
    index = torch.arange(start, start + length)
    if (begin, end) == (0, size):
        return index % size
    return index - begin


def _scatter_dense(piece: "_Piece", m: int, n: int) -> torch.Tensor:
    dense = torch.zeros(m, n, dtype=piece.U.dtype, device=piece.U.device)
    rows = torch.arange(piece.row_start, piece.row_start + piece.h) % m
    cols = torch.arange(piece.col_start, piece.col_start + piece.c) % n
    dense[rows[:, None], cols[None, :]] = piece.U @ piece.V.T
    return dense


def _identical_runs(starts: np.ndarray, ends: np.ndarray):
    """Runs of components with identical intervals (no padding at all)."""
    order = np.lexsort((ends, starts))
    runs, current = [], [order[0]] if len(order) else []
    for a, b in zip(order[:-1], order[1:]):
        if starts[a] == starts[b] and ends[a] == ends[b]:
            current.append(b)
        else:
            runs.append(np.array(current))
            current = [b]
    if current:
        runs.append(np.array(current))
    return runs


def _centre_order(intervals, size: int) -> np.ndarray:
    """Pieces sorted by the cyclic centre of their (start, length) interval (full-axis ones first)."""
    starts = np.array([start for start, _ in intervals])
    lengths = np.array([length for _, length in intervals])
    centre = np.where(lengths >= size, -1.0, (starts + lengths / 2.0) % size)
    return np.lexsort((np.arange(len(starts)), centre))


def _class_centre_order(intervals, size: int, octaves: int) -> np.ndarray:
    """Pieces sorted by class of interval length (``octaves`` octaves per class, longest class
    first), then by cyclic centre within a class."""
    lengths = np.array([min(length, size) for _, length in intervals])
    centre_rank = np.empty(len(intervals), dtype=np.int64)
    centre_rank[_centre_order(intervals, size)] = np.arange(len(intervals))
    classes = np.floor(np.log2(np.maximum(lengths, 1)) / octaves).astype(np.int64)
    return np.lexsort((centre_rank, -classes))


def _grouped_order(intervals, ranks: np.ndarray, size: int) -> np.ndarray:
    """Pieces in the order of the grouped plan's runs along this axis (each run: pieces of
    similar length whose intervals share a short window, :func:`_length_class_runs`)."""
    if not len(intervals):
        return np.arange(0)
    starts = np.array([start for start, _ in intervals])
    ends = starts + np.array([length for _, length in intervals])
    cost = PlanCost()
    runs, _ = _length_class_runs(starts, ends, np.asarray(ranks), cost.overhead(), cost.rank_offset, 1, size)
    runs.sort(key=lambda run: (int(starts[run].min()), -len(run)))
    return np.concatenate(runs)


def _occupied_blocks(intervals, first, ranks, size: int, block: Tuple[int, int]) -> int:
    """Non-zero (features x t-columns) blocks of one "bsr" stage whose t columns are laid out
    as ``first`` gives (pieces' cyclic ``intervals`` along the features)."""
    features, columns = block
    occupied = set()
    for (start, length), a, rank in zip(intervals, first, ranks):
        feature_blocks = set()
        for begin, end, _, _ in _slices(start % size, start % size + min(length, size), size):
            feature_blocks.update(range(begin // features, (end - 1) // features + 1))
        for t_block in range(int(a) // columns, (int(a) + int(rank) - 1) // columns + 1):
            occupied.update((f, t_block) for f in feature_blocks)
    return len(occupied)


def _bsr_layout(intervals, ranks: np.ndarray, size: int, block: Tuple[int, int]) -> np.ndarray:
    """t's columns for one "bsr" stage (first column of each piece): of cyclic-centre order
    (the tiled plan's), the grouped plan's runs and length class first, the order storing the
    fewest blocks (a few long pieces among many short ones: in centre order every block of
    t-columns would hold a long piece and span the whole axis)."""
    best = None
    for order in (_centre_order(intervals, size), _grouped_order(intervals, ranks, size),
                  *(_class_centre_order(intervals, size, octaves) for octaves in (1, 2, 3))):
        first = _first_columns(order, ranks)
        count = _occupied_blocks(intervals, first, ranks, size, block)
        if best is None or count < best[0]:
            best = (count, first)
    return best[1]


def _first_columns(order: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """first[i]: the first of piece i's consecutive columns when pieces are laid out in ``order``."""
    first = np.empty(len(order), dtype=np.int64)
    first[order] = np.concatenate([[0], np.cumsum(ranks[order])[:-1]]) if len(order) else []
    return first


def _tile_rows(start: int, length: int, begin: int, end: int, size: int):
    """(positions in the tile, positions along the interval) where the cyclic interval
    [start, start + length) meets the tile [begin, end), or None."""
    along = torch.arange(length)
    where = (start + along) % size
    hit = (where >= begin) & (where < end)
    if not bool(hit.any()):
        return None
    return where[hit] - begin, along[hit]


def _touching_arc(intervals, first, ranks, begin: int, end: int, size: int, inner: int):
    """The shortest cyclic arc of t's columns holding every piece that meets [begin, end), as
    one or two (a, b) column ranges (two when it wraps past the last column); [] if none."""
    covered = np.zeros(inner, dtype=bool)
    for i, (start, length) in enumerate(intervals):
        stop = start + length
        if (start < end and stop > begin) or (stop > size and stop - size > begin) or length >= size:
            covered[first[i] : first[i] + ranks[i]] = True
    columns = np.flatnonzero(covered)
    if len(columns) == 0:
        return []
    gaps = np.diff(np.concatenate([columns, [columns[0] + inner]]))
    k = int(np.argmax(gaps))  # the arc starts after the largest gap
    a = int(columns[(k + 1) % len(columns)])
    length = inner - (int(gaps[k]) - 1)
    if a + length <= inner:
        return [(a, a + length)]
    return [(a, inner), (0, a + length - inner)]


def _choose_tiling(intervals, first, ranks, size: int, cost: PlanCost):
    """Tiles of one axis and each tile's arc, for the tile length in :data:`TILE_SIZES` (or the
    whole axis) with the lowest modelled cost: sum over GEMMs of tile x (arc + rank_offset) plus
    the per-call overhead."""
    inner = int(np.sum(ranks))
    best = None
    for tile in sorted({min(t, size) for t in TILE_SIZES} | {size}):
        tiles = []
        total = 0.0
        for begin in range(0, size, tile):
            end = min(size, begin + tile)
            segments = _touching_arc(intervals, first, ranks, begin, end, size, inner)
            if not segments:
                continue
            arc = sum(b - a for a, b in segments)
            total += (end - begin) * (arc + cost.rank_offset) + cost.overhead() * len(segments)
            tiles.append(((begin, end), segments))
        if best is None or total < best[0]:
            best = (total, tiles)
    return best[1]


def _tiled_stage(intervals, factors, first, ranks, size: int, cost: PlanCost):
    """One stage of the tiled plan: (begin, end, segment table, factor (tile x arc)) per tile.
    ``factors[i]`` holds piece i's rows along its interval (U or V), ``first[i]`` its first
    column in this stage's order of t."""
    tiles = []
    for (begin, end), segments in _choose_tiling(intervals, first, ranks, size, cost):
        arc_column = {}  # column of t -> column of the tile's factor
        for a, b in segments:
            for j in range(a, b):
                arc_column[j] = len(arc_column)
        factor = factors[0].new_zeros(end - begin, len(arc_column))
        for i, (start, length) in enumerate(intervals):
            rows = _tile_rows(start, length, begin, end, size)
            if rows is None:
                continue
            inside, along = rows  # positions in the tile, positions along the piece
            columns = torch.tensor([arc_column[first[i] + q] for q in range(int(ranks[i]))])
            factor[inside[:, None], columns[None, :]] = factors[i][along]
        tiles.append((begin, end, _segment_table(segments), factor))
    return tiles


def _segment_table(segments) -> tuple:
    """((t_begin, t_end, factor_begin, factor_end), ...) for a tile's arc segments."""
    table, offset = [], 0
    for a, b in segments:
        table.append((a, b, offset, offset + b - a))
        offset += b - a
    return tuple(table)


class ExportedGBLR(nn.Module):
    """Mask-free inference form of a GBLR layer (see module docstring)."""

    family = "gblr-exported"
    token_chunk = 1024  # rows per pass of forward (see there)
    # "bsr" plan: the stage-2 kernel gathers t's columns through the permutation (True), or t'
    # is written out first (False: one more pass over t, contiguous loads in the kernel)
    bsr_gather = True

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
        else:
            exported._build(pieces, dense_blocks, cost)
        return exported

    def _build(self, pieces: List[_Piece], dense_blocks, cost: PlanCost) -> None:
        m, n = self.out_features, self.in_features
        for rs, cs, block in dense_blocks:
            h, c = block.shape
            self.blocks.append((rs, rs + h, cs, cs + c))
            self.block_weights.append(self._frozen(block))
        if not pieces:
            return
        ranks = np.array([p.rank for p in pieces])
        col_s = np.array([p.col_start for p in pieces])
        col_e = col_s + np.array([p.c for p in pieces])
        row_s = np.array([p.row_start for p in pieces])
        row_e = row_s + np.array([p.h for p in pieces])
        if self.plan == "tiled":
            self._build_tiled(pieces, cost)
            return
        if self.plan == "factored":
            everything = np.arange(len(pieces))
            col_runs, row_runs = [everything], [everything]
        elif self.plan == "grouped":
            overhead, offset = cost.overhead(), cost.rank_offset
            col_runs, col_cost = _length_class_runs(col_s, col_e, ranks, overhead, offset, 1, n)
            row_runs, row_cost = _length_class_runs(row_s, row_e, ranks, overhead, offset, 1, m)
            if col_cost + row_cost >= m * n + cost.overhead():  # one dense GEMM is cheaper
                block = sum(_scatter_dense(p, m, n) for p in pieces)
                self.blocks.append((0, m, 0, n))
                self.block_weights.append(self._frozen(block))
                return
        else:
            col_runs = _identical_runs(col_s, col_e)
            row_runs = _identical_runs(row_s, row_e)
        dtype, device = pieces[0].U.dtype, pieces[0].U.device
        # stage 1: each run's V zero-padded to its window; t columns laid out run after run
        t_column = {}  # (piece, j) -> column of t
        offset = 0
        for run in col_runs:
            begin, end = _window(col_s[run], col_e[run], n)
            rank = int(ranks[run].sum())
            padded = rank
            if self.plan == "grouped" and rank < cost.min_rank:
                padded = cost.min_rank  # zero columns: a 16-wide GEMM is as fast as a 4-wide one
            V = torch.zeros(end - begin, padded, dtype=dtype, device=device)
            j = 0
            for i in run:
                p = pieces[i]
                V[_positions(p.col_start, p.c, begin, end, n), j : j + p.rank] = p.V
                for q in range(p.rank):
                    t_column[(int(i), q)] = offset + j + q
                j += p.rank
            self.column_groups.append((begin, end, offset, offset + padded))
            self.col_factors.append(self._frozen(V))
            offset += padded
        self.inner = offset
        # stage 2: runs over rows read t in their own order (one permutation between stages)
        order: List[int] = []
        for run in row_runs:
            begin, end = _window(row_s[run], row_e[run], m)
            rank = int(ranks[run].sum())
            U = torch.zeros(rank, end - begin, dtype=dtype, device=device)
            j = 0
            for i in run:
                p = pieces[i]
                U[j : j + p.rank, _positions(p.row_start, p.h, begin, end, m)] = p.U.T
                order.extend(t_column[(int(i), q)] for q in range(p.rank))
                j += p.rank
            self.row_groups.append((begin, end, len(order) - rank, len(order)))
            self.row_factors.append(self._frozen(U))
        if order != list(range(self.inner)):
            self.t_order = torch.tensor(order, dtype=torch.long, device=device)

    def _build_tiled(self, pieces: List[_Piece], cost: PlanCost) -> None:
        """The "tiled" plan (module docstring): per stage, t's columns in cyclic-centre order of
        that stage's intervals; per tile, the cyclic arc of columns touching it."""
        ranks = np.array([p.rank for p in pieces])
        self.inner = int(ranks.sum())
        stage1 = [(p.col_start, p.c) for p in pieces]
        stage2 = [(p.row_start, p.h) for p in pieces]
        col_first = _first_columns(_centre_order(stage1, self.in_features), ranks)  # piece -> t column
        row_first = _first_columns(_centre_order(stage2, self.out_features), ranks)  # piece -> t' column
        for begin, end, table, V in _tiled_stage(stage1, [p.V for p in pieces], col_first, ranks,
                                                 self.in_features, cost):
            self.column_tiles.append((begin, end, table))
            self.col_factors.append(self._frozen(V))            # (tile, arc)
        for begin, end, table, U in _tiled_stage(stage2, [p.U for p in pieces], row_first, ranks,
                                                 self.out_features, cost):
            self.row_tiles.append((begin, end, table))
            self.row_factors.append(self._frozen(U.T))          # (arc, tile)
        order = np.empty(self.inner, dtype=np.int64)  # t' column j holds t column order[j]
        for i, p in enumerate(pieces):
            order[row_first[i] : row_first[i] + p.rank] = np.arange(col_first[i], col_first[i] + p.rank)
        if not np.array_equal(order, np.arange(self.inner)):
            self.t_order = torch.tensor(order, dtype=torch.long, device=pieces[0].U.device)

    def _build_bsr(self, pieces: List[_Piece], block: Tuple[int, int]) -> None:
        """The "bsr" plan (module docstring): the tiled plan's two stage layouts as dense factor
        matrices, stored as their non-zero (block x block) tiles."""
        from ._bsr_matrix import BlockSparseMatrix

        m, n = self.out_features, self.in_features
        ranks = np.array([p.rank for p in pieces], dtype=np.int64)
        self.inner = inner = int(ranks.sum())
        source = pieces[0].U if pieces else (self.bias if self.bias is not None else torch.zeros(()))
        dtype, device = source.dtype, source.device
        features, columns = block
        col_first = _bsr_layout([(p.col_start, p.c) for p in pieces], ranks, n, (features, columns))
        row_first = _bsr_layout([(p.row_start, p.h) for p in pieces], ranks, m, (features, columns))
        V = torch.zeros(n, max(inner, 1), dtype=dtype, device=device)  # stage 1: (in, inner)
        U = torch.zeros(max(inner, 1), m, dtype=dtype, device=device)  # stage 2: (inner, out)
        order = np.arange(max(inner, 1), dtype=np.int64)  # t' column j holds t column order[j]
        for i, p in enumerate(pieces):
            a, b = int(col_first[i]), int(row_first[i])
            V[torch.arange(p.col_start, p.col_start + p.c) % n, a : a + p.rank] = p.V
            U[b : b + p.rank, torch.arange(p.row_start, p.row_start + p.h) % m] = p.U.T
            order[b : b + p.rank] = np.arange(a, a + p.rank)
        self.stage1 = BlockSparseMatrix(V, (features, columns))
        self.stage2 = BlockSparseMatrix(U, (columns, features))
        # stage 1's column blocks are t's (narrow): a 64-wide one runs as the tensor cores' M side
        # (Hopper's wgmma takes M = 64; at 32 it would fall back to older instructions)
        self.stage1.tokens_as_n = 64 <= columns < features
        if not np.array_equal(order, np.arange(len(order))):
            self.t_order = torch.tensor(order, dtype=torch.int32, device=device)

    # -- running -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the plan on chunks of :attr:`token_chunk` tokens, each written into its rows of
        the output: the intermediate t of a chunk stays in cache between the stages and the
        in-place accumulations (measured: 1.3x faster than whole-batch stages for the tiled plan
        on 4096 tokens, bench/RESULTS.md).

        The plan's in-place GEMMs cannot be differentiated; an input that requires grad (an
        exported layer inside a model whose other layers train, a saliency map) goes through
        the plan's dense matrix instead: the same function, differentiable in ``x`` (the
        exported factors are frozen)."""
        if torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                weight = self.to_dense()
            return nn.functional.linear(x, weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        tokens = x2.shape[0]
        if self.plan == "bsr":  # two kernel launches over the whole batch (no chunks)
            t = self.stage1(x2)
            if self.t_order is not None and not self.bsr_gather:  # t' written out, then read
                y = self.stage2(t.index_select(1, self.t_order), bias=self.bias)
            else:  # the stage-2 kernel reads t through the permutation
                y = self.stage2(t, index=self.t_order, bias=self.bias)
            return y.reshape(*lead, self.out_features)
        run = self._run_tiled if self.plan == "tiled" else self._run_grouped
        chunk = max(1, int(self.token_chunk))
        y = x2.new_empty(tokens, self.out_features)
        for first in range(0, tokens, chunk):
            run(x2[first : first + chunk], y[first : first + chunk])
        return y.reshape(*lead, self.out_features)

    def _run_grouped(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """The grouped / factored / exact plans on one chunk ``x2`` (T, in) into ``y`` (T, out)."""
        tokens = x2.shape[0]
        n, m = self.in_features, self.out_features
        # stage 1: t = [x[:, window_g] @ V_g]_g, a wrapping window as two accumulated calls
        t = None
        if len(self.column_groups) == 1 and self.column_groups[0][:2] == (0, n):
            t = x2 @ self.col_factors[0]  # (T, inner)
        elif self.column_groups:
            t = x2.new_empty(tokens, self.inner)
            for (begin, end, t0, t1), V in zip(self.column_groups, self.col_factors):
                out = t[:, t0:t1]  # written in place: (T, window) @ (window, rank)
                for i, (a, b, va, vb) in enumerate(_slices(begin, end, n)):
                    torch.addmm(out, x2[:, a:b], V[va:vb], beta=1 if i else 0, out=out)
        if t is not None and self.t_order is not None:
            t = t.index_select(1, self.t_order)  # stage-2 order
        # stage 2: y[:, window_g] += t[:, group_g] @ U_g
        single = len(self.row_groups) == 1 and self.row_groups[0][:2] == (0, m)
        if t is not None and single and not self.blocks:
            U = self.row_factors[0]
            if self.bias is not None:
                torch.addmm(self.bias, t, U, out=y)
            else:
                torch.mm(t, U, out=y)
            return
        self._start_output(y)
        if t is not None:
            for (begin, end, t0, t1), U in zip(self.row_groups, self.row_factors):
                tg = t[:, t0:t1]
                for a, b, ua, ub in _slices(begin, end, m):
                    out = y[:, a:b]  # accumulated in place: (T, rank) @ (rank, window)
                    torch.addmm(out, tg, U[:, ua:ub], out=out)
        for (r0, r1, c0, c1), B in zip(self.blocks, self.block_weights):
            for a, b, ua, ub in _slices(r0, r1, m):
                for c, d, va, vb in _slices(c0, c1, n):
                    out = y[:, a:b]
                    torch.addmm(out, x2[:, c:d], B[ua:ub, va:vb].T, out=out)

    def _run_tiled(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """The tiled plan on one chunk: stage-1 tiles accumulate into t, stage-2 tiles write
        each output tile once (bias included), tiles nothing touches get the bias alone."""
        if not self.inner:
            self._start_output(y)
            return
        t = x2.new_zeros(x2.shape[0], self.inner)
        for (begin, end, segments), V in zip(self.column_tiles, self.col_factors):
            xs = x2[:, begin:end]
            for a, b, va, vb in segments:  # t[:, arc] += x[:, tile] @ V_tile, in place
                out = t[:, a:b]
                torch.addmm(out, xs, V[:, va:vb], out=out)
        if self.t_order is not None:
            t = t.index_select(1, self.t_order)
        written = 0
        for (begin, end, segments), U in zip(self.row_tiles, self.row_factors):
            out = y[:, begin:end]
            if begin > written:  # rows of the output no component touches
                self._start_output(y, written, begin)
            for i, (a, b, ua, ub) in enumerate(segments):  # y[:, tile] (+)= t'[:, arc] @ U_tile
                if i:
                    torch.addmm(out, t[:, a:b], U[ua:ub], out=out)
                elif self.bias is not None:
                    torch.addmm(self.bias[begin:end], t[:, a:b], U[ua:ub], out=out)
                else:
                    torch.mm(t[:, a:b], U[ua:ub], out=out)
            written = end
        if written < self.out_features:
            self._start_output(y, written)

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


def _fastest(candidates: List["ExportedGBLR"], rounds: int = 5) -> "ExportedGBLR":
    """The candidate with the lowest wall time on a random calibration batch: rounds interleave
    the candidates (so a burst of load hits all of them), and each keeps its best round (the
    least disturbed measurement), after one warm-up call each."""
    import time

    first = candidates[0]
    reference = next(iter(first.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    x = torch.randn(CALIBRATION_TOKENS, first.in_features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        kept = []
        for candidate in candidates:
            try:
                candidate(x)  # warm-up (and, for "bsr", the Triton kernels' compilation)
            except Exception as error:  # noqa: BLE001 - a Triton that rejects the kernel
                if candidate.plan != "bsr":
                    raise
                warnings.warn(f"export: the bsr plan failed on this device and is skipped ({error})")
                continue
            kept.append(candidate)
    candidates = kept
    best = [float("inf")] * len(candidates)
    with torch.no_grad():
        for _ in range(rounds):
            for i, candidate in enumerate(candidates):
                sync()
                started = time.perf_counter()
                candidate(x)
                sync()
                best[i] = min(best[i], time.perf_counter() - started)
    return candidates[int(np.argmin(best))]


def _check_sigma(layer, name: str, exact_masks: bool) -> None:
    """Refuse a GBLR layer at a finite sigma unless ``exact_masks`` (see :func:`export`)."""
    sigma = getattr(layer, "sigma", None)
    if sigma is not None and not exact_masks:
        raise ValueError(
            f"export: {name} has sigma={sigma} (Gaussian-smoothed masks), but an exported plan "
            f"runs exact boxcar masks; set its sigma to None (set_sigma(model, None)) or pass "
            f"exact_masks=True to export the exact masks"
        )


def _export_layer(module: nn.Module, plan: str, cost: Optional[PlanCost], name: str,
                  exact_masks: bool) -> nn.Module:
    from ._gblr import GBLRLinear

    if isinstance(module, GBLRLinear):
        return ExportedGBLR.from_gblr(module, plan=plan, cost=cost, exact_masks=exact_masks, name=name)
    if isinstance(module, StructuredLinear) and hasattr(module, "export"):
        return module.export()
    return module


def export(
    module_or_model: nn.Module, *, plan: Optional[str] = None, cost: Optional[PlanCost] = None,
    exact_masks: bool = False,
) -> nn.Module:
    """Inference copy of a structured layer or of a whole model, in eval mode, with every GBLR
    layer replaced by its mask-free execution plan (``plan`` in :data:`EXPORT_PLANS`, default
    :data:`DEFAULT_PLAN`; ``cost``: the grouped plan's :class:`PlanCost`).  The input is left untouched.

    A plan runs exact 0/1 boxcar masks: what a GBLR layer computes at ``sigma=None``.  A layer at
    a finite ``sigma`` computes Gaussian-smoothed masks, a different function, so it is refused
    (``ValueError`` naming the layer and its sigma) unless ``exact_masks=True``: export the exact
    masks that layer converges to as sigma grows (the layer's own output at ``sigma=None``).
    Training ends with ``set_sigma(model, None)`` for the same reason."""
    from ._surgery import set_module

    plan = DEFAULT_PLAN if plan is None else plan
    if plan not in EXPORT_PLANS:
        raise ValueError(f"plan must be one of {EXPORT_PLANS}, got {plan!r}")
    model = copy.deepcopy(module_or_model).eval()
    if isinstance(model, StructuredLinear):
        return _export_layer(model, plan, cost, "the GBLR layer", exact_masks).eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, StructuredLinear)]
    for name, layer in targets:
        _check_sigma(layer, f"GBLR layer {name!r}", exact_masks)  # every layer before any work
    for name, layer in targets:
        set_module(model, name, _export_layer(layer, plan, cost, f"GBLR layer {name!r}", exact_masks))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
