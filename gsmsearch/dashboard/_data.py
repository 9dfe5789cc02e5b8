"""Pure computations behind the dashboard views (no plotting, no I/O).

Everything takes :class:`~gsmsearch.search.TrialRecord` lists (or a StudyView holding them), and
an x (cost, minimised) / y (quality, maximised) pair of metrics:

- :func:`metric_value`: a trial's value of a metric (its objective value, else its result);
- :func:`family_points`: per family, every trial with both values, marked front / dominated /
  infeasible (the front is per family, over feasible COMPLETE trials);
- :func:`family_hypervolumes` and :func:`hypervolume_history`: the area each family's front
  dominates up to one shared reference point, and how it grew trial after trial;
- :func:`budget_table`: at each budget, each family's best quality with x <= budget;
- :func:`coverage_counts`: how many GBLR components cover each weight entry, from the recorded
  intervals (exact, or block-averaged for big layers);
- :func:`layer_budget`: how a trial's FLOPs are spread over its layers;
- :func:`drawn_records`: where configurations ran with several seeds, one record per
  configuration holding its means (what the fronts, hypervolumes and budget table are computed
  from), with each one's :class:`SeedSpread`; :func:`configuration_rows` tabulates them.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..search._pareto import (Configuration, Spread, best_within_budget, configuration_key, group_configurations,
                              has_repeats, hypervolume_2d, pareto_front, trial_seed)
from ..search._study import TrialRecord, metric_label, split_qualities

__all__ = [
    "Point", "metric_value", "trial_families", "family_points", "family_hypervolumes",
    "hypervolume_history", "budget_table", "coverage_counts", "layer_budget", "trial_rows",
    "config_summary", "layer_structure", "FAMILY_ORDER", "SeedSpread", "drawn_records", "configuration_rows",
    "metric_title", "other_split_quality", "split_note", "SAMPLE_SEED", "Sampled", "sample", "sample_points",
]

#: GBLR first, then the hand-crafted families, dense last (unknown families after, sorted)
FAMILY_ORDER = ("gblr", "lowrank", "blockdiag", "monarch", "blocksparse", "blocklowrank", "blast", "dense")

_DIRECTIONS = ("maximize", "minimize")  # (y, x)


@dataclass(frozen=True)
class Point:
    number: int
    family: str
    x: float
    y: float
    status: str  # "front", "dominated" or "infeasible"


#: the seed of the uniform sample of a big study's dominated trials (the same sample at every
#: refresh and in every report of the same study)
SAMPLE_SEED = 0


@dataclass(frozen=True)
class Sampled:
    """What a sample left out: ``shown`` of ``total`` items, drawn uniformly with ``seed``."""

    shown: int
    total: int
    seed: int = SAMPLE_SEED

    def note(self, what: str, kept: str = "every front member shown") -> str:
        return (f"showing {self.shown:,} of {self.total:,} {what}, sampled uniformly with seed {self.seed}; "
                f"{kept}")


def sample(items: Sequence[Any], keep: Callable[[Any], bool], cap: Optional[int],
           seed: int = SAMPLE_SEED) -> Tuple[List[Any], Optional[Sampled]]:
    """Every item for which ``keep(item)`` holds, and of the others: all when there are at most
    ``cap`` (or ``cap`` is None), else ``cap`` of them drawn uniformly at random without
    replacement (``random.Random(seed)``); in input order.  The :class:`Sampled` says how many
    of the others are shown, None when none was left out."""
    others = [index for index, item in enumerate(items) if not keep(item)]
    if cap is None or len(others) <= cap:
        return list(items), None
    chosen = set(random.Random(seed).sample(others, cap))
    return ([item for index, item in enumerate(items) if index in chosen or keep(item)],
            Sampled(shown=cap, total=len(others), seed=seed))


def sample_points(points: Dict[str, List["Point"]], cap: Optional[int],
                  seed: int = SAMPLE_SEED) -> Tuple[Dict[str, List["Point"]], Optional[Sampled]]:
    """:func:`family_points`' points with every front point (of every family's front) and every
    dense trial kept, and at most ``cap`` of the dominated and infeasible points of all families
    together (:func:`sample`)."""
    flat = [point for family_pts in points.values() for point in family_pts]
    kept, sampled = sample(flat, lambda p: p.status == "front" or p.family == "dense", cap, seed)
    if sampled is None:
        return points, None
    out: Dict[str, List[Point]] = {family: [] for family in points}
    for point in kept:
        out[point.family].append(point)
    return out, sampled


_MEMO: "OrderedDict[tuple, Tuple[Any, int, Any]]" = OrderedDict()


def _memo(kind: str, records, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per (``kind``, records list, ``key``): every view of a study
    (fronts, comparison, hypervolume, budgets, tables, the report's notes) groups and splits the
    same records list, which on a study of 100,000 trials costs seconds each time.  The last few
    results are kept, each with its list (the same object, of the same length)."""
    memo_key = (kind, id(records), key)
    kept = _MEMO.get(memo_key)
    if kept is not None and kept[0] is records and kept[1] == len(records):
        _MEMO.move_to_end(memo_key)
        return kept[2]
    result = make()
    _MEMO[memo_key] = (records, len(records), result)
    while len(_MEMO) > 24:
        _MEMO.popitem(last=False)
    return result


def _configurations(records) -> List[Configuration]:
    """``group_configurations(records)``, once per records list (:func:`_memo`)."""
    return _memo("configurations", records, (), lambda: group_configurations(records))


def _repeats(records) -> bool:
    """``has_repeats(group_configurations(records))``: at once False when no two of the trials
    that belong to a configuration share their family and parameters other than the seed (then
    no configuration has two trials; a study that samples its knobs), or when they all ran with
    one seed (the usual study), as then no configuration can have two.  The first check reads no
    trial's recorded config."""
    def compute() -> bool:
        members = [r for r in records if r.state != "PRUNED" and not (r.state == "FAIL" and _final(r) is False)]
        seen = set()
        for r in members:
            # what configuration_key compares, less the recorded config: a coarser grouping
            key = (str(r.family), tuple(sorted((str(k), repr(v)) for k, v in r.params.items() if k != "seed")))
            if key in seen:
                break
            seen.add(key)
        else:
            return False
        return len({repr(trial_seed(r)) for r in members}) > 1 and has_repeats(_configurations(records))

    return _memo("repeats", records, (), compute)


def _final(record):
    return record.user_attrs.get("final", True) if isinstance(record.user_attrs, dict) else True


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def metric_value(record, metric: str, metric_names: Sequence[str]) -> Optional[float]:
    """The trial's objective value for ``metric`` if it is an objective, else its recorded result
    value; None when missing or not finite."""
    if record.values is not None and metric in metric_names:
        index = list(metric_names).index(metric)
        if index < len(record.values):
            return _finite(record.values[index])
    result = record.user_attrs.get("result")
    if isinstance(result, dict):
        return _finite(result.get(metric))
    return None


def metric_title(metric: str, view) -> str:
    """``metric`` as a column or axis names it for ``view``'s study: ``quality`` with the split it
    was measured on ("quality (val)", or "quality (test)" for a study an older gsmsearch
    recorded), other metrics as they are."""
    return metric_label(metric, getattr(view, "objective_split", "test"))


def other_split_quality(record, view) -> Tuple[str, Optional[float]]:
    """(its title, the value) of a COMPLETE trial's quality on the split its study does not select
    on: the test quality of a validation-selected study, the validation quality of an older one;
    shown beside the objective, never used to choose anything.  The value is None when missing."""
    split = getattr(view, "objective_split", "test")
    other = "test" if split == "val" else "val"
    value = None
    if record.state == "COMPLETE":
        val, test = split_qualities(record, split)
        value = _finite(test if other == "test" else val)
    return metric_label("quality", other), value


def split_note(view) -> str:
    """What ``view``'s quality values are, in words, for the list of studies."""
    if getattr(view, "objective_split", "test") == "val":
        return "quality on the validation split (fronts chosen on it; test quality recorded beside it)"
    return ("quality on the test split: recorded by an older gsmsearch, its fronts were chosen on test data "
            "(validation quality beside it where recorded)")


def family_sort_key(family: str):
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family)


def trial_families(records, families: Optional[Sequence[str]] = None) -> List[str]:
    """The families present in ``records`` (restricted to ``families`` when given), GBLR first."""
    found = {r.family for r in records if r.family and isinstance(r.family, str)}
    if families is not None:
        found &= set(families)
    return sorted(found, key=family_sort_key)


def _complete_xy(records, x: str, y: str, metric_names) -> List[Tuple[Any, float, float]]:
    """(record, x, y) of the COMPLETE records with finite values of both, in order (each value
    :func:`metric_value`'s)."""
    names = list(metric_names)
    x_index = names.index(x) if x in names else None
    y_index = names.index(y) if y in names else None

    def value(record, index, metric):
        values = record.values
        if index is not None and values is not None and index < len(values):
            return _finite(values[index])  # an objective: what metric_value gives, found once
        return metric_value(record, metric, names)

    out = []
    for r in records:
        if r.state != "COMPLETE":
            continue
        xv, yv = value(r, x_index, x), value(r, y_index, y)
        if xv is not None and yv is not None:
            out.append((r, xv, yv))
    return out


def _all_xy(records, x: str, y: str, metric_names) -> List[Tuple[Any, float, float]]:
    """``_complete_xy(records, ...)``, once per records list (:func:`_memo`): every view filters
    it (by family, feasibility) instead of reading each record's values again."""
    return _memo("xy", records, (x, y, tuple(metric_names)), lambda: _complete_xy(records, x, y, metric_names))


def family_points(records, x: str, y: str, metric_names, families=None) -> Dict[str, List[Point]]:
    """family -> its COMPLETE trials with finite x and y, each marked "front" (non-dominated among
    the family's feasible trials), "dominated" (feasible, not on the front) or "infeasible"."""
    key = (x, y, tuple(metric_names), None if families is None else tuple(families))
    points = _memo("points", records, key, lambda: _family_points(records, x, y, metric_names, families))
    return {family: list(family_pts) for family, family_pts in points.items()}


def _family_points(records, x: str, y: str, metric_names, families=None) -> Dict[str, List[Point]]:
    out: Dict[str, List[Point]] = {}
    for family in trial_families(records, families):
        rows = [row for row in _all_xy(records, x, y, metric_names) if row[0].family == family]
        feasible = [row for row in rows if row[0].feasible]
        front = {id(feasible[i][0]) for i in pareto_front([(yv, xv) for _, xv, yv in feasible], _DIRECTIONS)}
        points = []
        for r, xv, yv in rows:
            status = "infeasible" if not r.feasible else "front" if id(r) in front else "dominated"
            points.append(Point(r.number, family, xv, yv, status))
        out[family] = points
    return out


def _hypervolume(points: Iterable[Tuple[float, float]], reference: Tuple[float, float]) -> float:
    """Area dominated by (x, y) points: x minimised, y maximised, bounded by reference (x, y)."""
    return hypervolume_2d([(yv, xv) for xv, yv in points], _DIRECTIONS, (reference[1], reference[0]))


def family_hypervolumes(records, x: str, y: str, metric_names, reference: Tuple[float, float],
                        families=None) -> Dict[str, float]:
    """family -> hypervolume of its feasible COMPLETE trials, all against the same ``reference``
    (x, y)."""
    out = {}
    for family in trial_families(records, families):
        rows = [row for row in _all_xy(records, x, y, metric_names) if row[0].family == family and row[0].feasible]
        out[family] = _hypervolume([(xv, yv) for _, xv, yv in rows], reference)
    return out


def hypervolume_history(records, x: str, y: str, metric_names, reference: Tuple[float, float],
                        families=None) -> Dict[str, List[Tuple[int, float]]]:
    """family -> [(trial number, hypervolume of the family's feasible COMPLETE trials numbered up
    to it)], one entry per such trial, in trial order; "all" holds the same over every family.
    Where configurations ran with several seeds: of the feasible means of the configurations'
    seeds numbered up to it, one entry per COMPLETE trial with both values from the first trial
    that gives the family a feasible configuration on (a mean may fall as seeds come in, so this
    hypervolume may shrink)."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    chosen = trial_families(records, families)
    if _repeats(records):
        return _seeded_history(records, x, y, metric_names, reference, chosen)
    rows = sorted([row for row in _all_xy(records, x, y, metric_names) if row[0].feasible and row[0].family in chosen],
                  key=lambda row: row[0].number)
    for family in chosen + ["all"]:
        mine = [row for row in rows if family == "all" or row[0].family == family]
        # the hypervolume of the trials so far is that of their front: a trial that the front
        # weakly dominates leaves it (and the value) as it is; else it joins the front, dropping
        # the points it dominates (each trial costs the front's size, not the trials so far)
        history, front, volume = [], [], 0.0
        for r, xv, yv in mine:
            if not any(fx <= xv and fy >= yv for fx, fy in front):
                front = [(fx, fy) for fx, fy in front if not (xv <= fx and yv >= fy)] + [(xv, yv)]
                volume = _hypervolume(front, reference)
            history.append((r.number, volume))
        out[family] = history
    return out


def budget_table(records, x: str, y: str, metric_names, budgets: Sequence[float],
                 families=None) -> Dict[str, Dict[float, Optional[Point]]]:
    """family -> {budget: the feasible COMPLETE trial with the highest y among those with
    x <= budget (ties: the cheaper, then the lower trial number), or None}."""
    out: Dict[str, Dict[float, Optional[Point]]] = {}
    for family in trial_families(records, families):
        rows = sorted([row for row in _all_xy(records, x, y, metric_names)
                       if row[0].family == family and row[0].feasible], key=lambda row: row[0].number)
        best = best_within_budget([yv for _, _, yv in rows], [xv for _, xv, _ in rows], list(budgets))
        out[family] = {
            budget: None if index is None else Point(rows[index][0].number, family, rows[index][1],
                                                     rows[index][2], "front")
            for budget, index in best.items()
        }
    return out


def _cover_fractions(start: int, length: int, size: int, edges: np.ndarray) -> np.ndarray:
    """Per block of ``edges``: the fraction of its cells inside the cyclic interval
    [start, start + length) on ``size`` cells (computed from the interval's at most two linear
    pieces, so a layer of any size costs only its number of blocks)."""
    length = max(0, min(int(length), size))
    start = int(start) % size
    lower, upper = edges[:-1], edges[1:]
    covered = np.zeros(len(edges) - 1)
    for a, b in ((start, min(start + length, size)), (0, max(0, start + length - size))):
        if b > a:
            covered += np.clip(np.minimum(b, upper) - np.maximum(a, lower), 0, None)
    return covered / np.diff(edges)


def _block_edges(size: int, cells: int) -> np.ndarray:
    """Edges of ``cells`` near-equal blocks over ``size`` entries."""
    return np.unique(np.linspace(0, size, cells + 1).round().astype(np.int64))


def coverage_counts(intervals: Sequence[Sequence[int]], out_features: int, in_features: int,
                    max_cells: Optional[int] = 128) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many components cover each weight entry.

    ``intervals``: per component [row_start, row_len, col_start, col_len], cyclic over
    ``out_features`` rows and ``in_features`` columns.  Returns (counts, row_edges, col_edges):
    counts is (out, in) when both sides fit in ``max_cells``; otherwise each side is cut into at
    most ``max_cells`` near-equal blocks and counts holds the exact mean count over each block
    (the cover of a component is a product of a row and a column indicator, so the block mean is
    the product of the row and column block means).  Block i spans rows row_edges[i]:row_edges[i+1].
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer sizes must be positive, got out={out_features}, in={in_features}")
    rows = _block_edges(out_features, min(out_features, max_cells or out_features))
    cols = _block_edges(in_features, min(in_features, max_cells or in_features))
    row_cover = np.zeros((len(intervals), len(rows) - 1))  # (K, row blocks)
    col_cover = np.zeros((len(intervals), len(cols) - 1))  # (K, col blocks)
    for k, interval in enumerate(intervals):
        if len(interval) != 4:
            raise ValueError(f"an interval is [row_start, row_len, col_start, col_len], got {interval!r}")
        row_start, row_len, col_start, col_len = (int(v) for v in interval)
        row_cover[k] = _cover_fractions(row_start, row_len, out_features, rows)
        col_cover[k] = _cover_fractions(col_start, col_len, in_features, cols)
    counts = row_cover.T @ col_cover  # (row blocks, col blocks)
    return counts, rows, cols


#: the largest layer side and component count drawn as a structure (larger: a malformed record)
MAX_LAYER_SIZE = 1 << 31
MAX_COMPONENTS = 100_000


def _whole(value) -> Optional[int]:
    """``value`` as an int when it is a whole number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def layer_structure(layer) -> Tuple[Optional[Tuple[int, int, List[List[int]]]], Optional[str]]:
    """((out_features, in_features, intervals), None) for a layer record whose learned structure
    can be drawn, else (None, why not).  Interval lengths are clipped to the layer's sides."""
    if not isinstance(layer, dict):
        return None, f"expected a mapping, got {type(layer).__name__}"
    out_features, in_features = _whole(layer.get("out_features")), _whole(layer.get("in_features"))
    if out_features is None or in_features is None or not (0 < out_features <= MAX_LAYER_SIZE
                                                           and 0 < in_features <= MAX_LAYER_SIZE):
        return None, (f"out_features and in_features must be whole numbers in 1..{MAX_LAYER_SIZE}, got "
                      f"{str(layer.get('out_features'))[:40]!r} and {str(layer.get('in_features'))[:40]!r}")
    intervals = layer.get("intervals")
    if not isinstance(intervals, list):
        return None, f"intervals must be a list, got {type(intervals).__name__}"
    if len(intervals) > MAX_COMPONENTS:
        return None, f"{len(intervals)} intervals (more than {MAX_COMPONENTS:,} are not drawn)"
    clean = []
    for k, interval in enumerate(intervals):
        values = [_whole(v) for v in interval] if isinstance(interval, (list, tuple)) else []
        if len(values) != 4 or any(v is None for v in values):
            return None, (f"interval {k} is not [row_start, row_len, col_start, col_len] as whole numbers: "
                          f"{str(interval)[:60]}")
        row_start, row_len, col_start, col_len = values
        clean.append([row_start % out_features, max(0, min(row_len, out_features)),
                      col_start % in_features, max(0, min(col_len, in_features))])
    return (out_features, in_features, clean), None


def layer_budget(layers: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per structured layer: name, family, flops, dense_flops, its share of the layers' total
    FLOPs and its own relative FLOPs (flops / dense_flops), in the recorded order."""
    rows = []
    if not isinstance(layers, dict):
        return rows
    for name, layer in layers.items():
        if not isinstance(layer, dict):
            continue
        flops, dense = _finite(layer.get("flops")) or 0.0, _finite(layer.get("dense_flops")) or 0.0
        rows.append({"layer": str(name), "family": str(layer.get("family", "")), "flops": flops,
                     "dense_flops": dense, "relative": flops / dense if dense else math.nan})
    total = sum(row["flops"] for row in rows)
    for row in rows:
        row["share"] = row["flops"] / total if total else math.nan
    return rows


#: trial-config keys that are the same for every trial of a study (left out of hover text)
_CONFIG_SKIP = {"family", "workload", "workload_options", "include", "exclude", "device", "measure_latency",
                "latency_batch", "mode", "epochs", "batch_size"}


def config_summary(record) -> Dict[str, Any]:
    """The trial's configuration as shown on hover: sampled params, then the set config knobs."""
    out: Dict[str, Any] = {}
    for key, value in record.params.items():
        if key != "family":
            out[key.split(".", 1)[-1]] = value
    config = record.user_attrs.get("config")
    if isinstance(config, dict):
        for key, value in config.items():
            if key in _CONFIG_SKIP or key in out or value in (None, {}, []):
                continue
            out[key] = value
    return out


def _cell(value):
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


_FIXED_COLUMNS = {"id", "study", "number", "state", "family", "feasible", "front", "failure reason", "epochs",
                  "samples/s", "peak memory (MiB)", "precision", "world size"}


def trial_rows(view, x: str, y: str, families=None) -> List[Dict[str, Any]]:
    """One flat row per trial (every state) for the trials table: study, number, state, family,
    feasible, front (where configurations ran with several seeds: its configuration's means are
    on the front), the objectives and axes, the sampled parameters and the failure reason."""
    return sampled_trial_rows(view, x, y, families)[0]


def sampled_trial_rows(view, x: str, y: str, families=None,
                       cap: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Optional[Sampled]]:
    """:func:`trial_rows` of every front trial and, of the other trials (every state), all when
    at most ``cap``, else ``cap`` of them drawn uniformly (:func:`sample`); with what was left
    out (None: nothing)."""
    drawn, spreads = drawn_records(view.records, x, y, view.metric_names)
    points = family_points(drawn, x, y, view.metric_names, families)
    status = {(p.family, p.number): p.status for ps in points.values() for p in ps}
    for number, spread in spreads.items():  # a trial is on the front when its configuration is
        family = spread.configuration.family
        for trial, *_ in spread.seeds:
            status[(family, trial)] = status.get((family, number))
    metrics = list(dict.fromkeys(list(view.metric_names) + [y, x]))
    # a metric named like one of the fixed columns (Optuna lets a study name its objectives
    # anything) gets its own column instead of overwriting that one; quality says its split
    titles = {m: metric_title(m, view) for m in metrics}
    column = {m: f"{titles[m]} (metric)" if titles[m] in _FIXED_COLUMNS else titles[m] for m in metrics}
    chosen = set(trial_families(view.records, families))
    records = [r for r in view.records if families is None or r.family in chosen]
    records, sampled = sample(records, lambda r: status.get((r.family, r.number)) == "front", cap)
    rows = []
    for r in records:
        row = {"id": f"{view.key}:{r.number}", "study": view.label, "number": r.number, "state": r.state,
               "family": str(r.family or ""),
               "feasible": ("yes" if r.feasible else "no") if r.state == "COMPLETE" else "",
               "front": "yes" if status.get((r.family, r.number)) == "front" else ""}
        for metric in metrics:
            row[column[metric]] = _cell(metric_value(r, metric, view.metric_names))
            if metric == "quality":  # the other split's quality beside it (recorded, not selected on)
                title, value = other_split_quality(r, view)
                row[title] = _cell(value)
        for key, value in r.params.items():
            if key != "family":
                row[f"param {key}"] = _cell(value)
        row.update(_run_columns(r))
        reason = r.failure_reason
        if r.state == "PRUNED" and r.user_attrs.get("duplicate_of") is not None:
            reason = f"duplicate of trial {r.user_attrs['duplicate_of']}"
        elif r.state == "PRUNED" and r.user_attrs.get("prune_reason"):
            reason = f"pruned: {r.user_attrs['prune_reason']}"
        row["failure reason"] = "" if reason is None else str(reason)
        rows.append(row)
    return rows, sampled


def _run_columns(record) -> Dict[str, Any]:
    """How a trial ran, for the trials table: training throughput, peak memory (MiB; "GPU" is
    torch's peak allocation on the device, "RSS" the worker process's peak resident set),
    precision, world size and the epochs trained (a pruned trial's: those before it stopped)."""
    result = record.user_attrs.get("result")
    result = result if isinstance(result, dict) else {}
    peak, kind = result.get("peak_memory_bytes"), result.get("peak_memory_kind")
    label = {"cuda_max_allocated": "GPU", "process_peak_rss": "RSS"}.get(kind, "")
    pruned = record.user_attrs.get("pruned")
    epochs = result.get("epochs_run")
    if isinstance(pruned, dict):
        epochs = pruned.get("stopped_after_epoch")
    return {
        "epochs": _cell(epochs),
        "samples/s": _cell(None if result.get("samples_per_second") is None
                           else round(float(result["samples_per_second"]), 1)),
        "peak memory (MiB)": "" if not isinstance(peak, (int, float)) else f"{peak / 2**20:.1f} {label}".strip(),
        "precision": _cell(result.get("precision")),
        "world size": _cell(result.get("world_size")),
    }


@dataclass(frozen=True)
class SeedSpread:
    """The seeds behind a configuration's drawn point: x and y over its completed seeds with both
    values, (trial number, seed, x, y) of each, and the configuration (failed and pending seeds)."""

    configuration: Configuration
    x: Spread
    y: Spread
    seeds: Tuple[Tuple[int, Any, float, float], ...]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def failed(self) -> List[Tuple[int, Any]]:
        return [(r.number, trial_seed(r)) for r in self.configuration.failed]

    @property
    def pending(self) -> List[Tuple[int, Any]]:
        return [(r.number, trial_seed(r)) for r in self.configuration.pending]


def _xy(x: str, y: str, metric_names):
    return lambda record: (metric_value(record, x, metric_names), metric_value(record, y, metric_names))


def _mean_record(configuration: Configuration, x: str, y: str, metric_names):
    """(a COMPLETE record holding the configuration's mean x and y and mean constraints, its
    SeedSpread), or None when no completed seed has both values."""
    value = _xy(x, y, metric_names)
    usable = configuration.usable(value)
    if not usable:
        return None
    x_spread, y_spread = configuration.spreads(value)
    first = usable[0][0]
    record = TrialRecord(number=first.number, state="COMPLETE", family=configuration.family, values=None,
                         params=dict(first.params), user_attrs={"result": {x: x_spread.mean, y: y_spread.mean},
                                                                "config": first.user_attrs.get("config")},
                         constraints=configuration.mean_constraints(value))
    seeds = tuple((r.number, trial_seed(r), xv, yv) for r, (xv, yv) in usable)
    return record, SeedSpread(configuration, x_spread, y_spread, seeds)


def drawn_records(records, x: str, y: str, metric_names) -> Tuple[list, Dict[int, SeedSpread]]:
    """What the figures and the budget table are computed from: ``(records, {})`` when no
    configuration was tried with more than one seed; else one COMPLETE record per configuration with a completed seed that
    has both values, holding the means of x and y and of each constraint (so a configuration is
    feasible when its mean constraints hold), numbered as its first such trial, and
    {that number: its SeedSpread}.  Trials of other states are left out (no configuration of
    theirs has a mean)."""
    return _memo("drawn", records, (x, y, tuple(metric_names)), lambda: _drawn(records, x, y, metric_names))


def _drawn(records, x: str, y: str, metric_names) -> Tuple[list, Dict[int, SeedSpread]]:
    if not _repeats(records):
        return list(records), {}
    configurations = _configurations(records)
    out, spreads = [], {}
    for configuration in configurations:
        made = _mean_record(configuration, x, y, metric_names)
        if made is not None:
            out.append(made[0])
            spreads[made[0].number] = made[1]
    return out, spreads


def _seeded_history(records, x, y, metric_names, reference, chosen) -> Dict[str, List[Tuple[int, float]]]:
    out: Dict[str, List[Tuple[int, float]]] = {family: [] for family in chosen + ["all"]}
    value = _xy(x, y, metric_names)
    rows = sorted(_complete_xy([r for r in records if r.family in chosen], x, y, metric_names),
                  key=lambda row: row[0].number)
    groups: Dict[Any, Configuration] = {}
    means: Dict[Any, Tuple[str, float, float]] = {}  # key -> (family, x, y) of the feasible ones
    for record, _, _ in rows:
        key = configuration_key(record)
        group = groups.setdefault(key, Configuration(family=record.family, params={}))
        group.complete.append(record)
        if group.feasible(value):
            x_spread, y_spread = group.spreads(value)
            means[key] = (record.family, x_spread.mean, y_spread.mean)
        else:
            means.pop(key, None)
        for family in (record.family, "all"):
            points = [(xm, ym) for f, xm, ym in means.values() if family == "all" or f == family]
            if points or out[family]:  # from its first feasible configuration on
                out[family].append((record.number, _hypervolume(points, reference)))
    return out


def _mean_text(spread: Spread) -> str:
    return f"{spread.mean:.4g}" if spread.std is None else f"{spread.mean:.4g} ± {spread.std:.2g}"


def configuration_rows(view, x: str, y: str, families=None) -> List[Dict[str, Any]]:
    """One row per configuration with a completed seed, where configurations ran with several
    seeds (else no rows), cheapest first per family: study, family, its knobs, front (of the
    family's means), feasible (by its mean constraints), n (completed seeds with both values), y
    and x as mean ± sample std (the mean alone for one seed), the trials behind it and its
    failed and pending seeds."""
    records, spreads = drawn_records(view.records, x, y, view.metric_names)
    if not spreads:
        return []
    points = family_points(records, x, y, view.metric_names, families)
    rows = []
    for family, family_pts in points.items():
        for point in sorted(family_pts, key=lambda p: (p.x, -p.y)):
            spread = spreads[point.number]
            knobs = {k.split(".", 1)[-1]: v for k, v in spread.configuration.params.items()}
            failed = ", ".join(f"seed {s} (trial {n})" for n, s in spread.failed)
            rows.append({
                "id": f"{view.key}:{point.number}", "study": view.label, "family": family,
                "configuration": ", ".join(f"{k}={_cell(v)}" for k, v in knobs.items()) or "(no knobs)",
                "front": "yes" if point.status == "front" else "",
                "feasible": "no" if point.status == "infeasible" else "yes",
                "n": spread.n, f"{metric_title(y, view)} (mean ± std)": _mean_text(spread.y),
                f"{metric_title(x, view)} (mean ± std)": _mean_text(spread.x),
                "trials": ", ".join(f"{n} (seed {s})" for n, s, _, _ in spread.seeds),
                "failed seeds": failed,
                "pending seeds": ", ".join(f"seed {s} (trial {n})" for n, s in spread.pending),
            })
    return rows
