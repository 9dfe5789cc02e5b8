"""The "grouped", "factored" and "exact" plans: components in runs along each axis, each run one
GEMM over the union of its intervals (see the package docstring)."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from ._common import PlanCost, _Piece, _positions, _slices, _window


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


class GroupedPlans:
    """:class:`~gsmsearch.structured._export.ExportedGBLR`'s building and running of the grouped,
    factored and exact plans (their tensors and tables live on the module, see its ``__init__``)."""

    def _build_grouped(self, pieces: List[_Piece], dense_blocks, cost: PlanCost) -> None:
        """The grouped, factored or exact plan (``self.plan``) of ``pieces``, plus ``dense_blocks``
        (the exact plan's (row_start, col_start, block) components counted as dense blocks)."""
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
