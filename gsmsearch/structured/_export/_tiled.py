"""The "tiled" plan: each axis cut into tiles, each tile one GEMM over the cyclic arc of t's
columns whose components touch it (see the package docstring)."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from ._common import PlanCost, _Piece, _centre_order, _first_columns

TILE_SIZES = (64, 128, 256)  # candidate tile lengths of the "tiled" plan


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


class TiledPlan:
    """:class:`~gsmsearch.structured._export.ExportedGBLR`'s building and running of the tiled plan."""

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
