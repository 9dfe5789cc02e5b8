"""Accuracy tables of bench/RESULTS.md, read on validation data, from the grids' JSON files.

Each cell is ``validation (test)``: mean ± sample standard deviation over seeds of the trials'
validation quality, and the same of their test quality beside it in brackets.  Each row's leader
is chosen by the *validation* mean (bold); below the table, one line per row gives the leader's
margin over the runner-up on validation (test difference of the same two beside it), the verdict
(*within noise* when the margin is smaller than the larger of the two validation seed standard
deviations, margins from the unrounded per-seed values) and the family that leads on test.
Quality is shown in % when the workload's test metric is accuracy, as stored otherwise (e.g.
MiniLM's mean cosine similarity).

Usage::

    .venv/bin/python -m bench.accuracy_tables bench/results/workloads-animal-mnist-vit.json
    # GBLR column from a second grid: a (family, budget) cell comes from the last file that has it
    .venv/bin/python -m bench.accuracy_tables bench/results/workloads-digits-mlp.json \\
        bench/results/workloads-digits-mlp-gblr-finetune-default.json
    # one row per file (single-budget grids), dense as a column
    .venv/bin/python -m bench.accuracy_tables --rows file --dense-column \\
        --label 1e-3 bench/results/workloads-animal-mnist-mixer-0.3-6seeds.json \\
        --label 2e-3 bench/results/workloads-animal-mnist-mixer-0.3-6seeds-lr2e-3.json

Dense trials (family ``dense``) are left out of the row leaders unless ``--dense-column``; the
dense line above the table gives them.  Records without a ``config`` (the self-distilled dense
file) count as dense trials of their ``workload``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.workloads import _mean_std, _test

FAMILY_ORDER = ("gblr", "lowrank", "blockdiag", "monarch", "blocksparse", "blocklowrank", "blast")
#: two means closer than this count as equal (identical trials, e.g. low-rank and one-block
#: block-low-rank); far below any difference a table can show
TIE = 1e-9


@dataclass
class Cell:
    val: List[float]  # per seed, in display units
    test: List[float]
    failed: int = 0

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val)

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test)

    @property
    def val_std(self) -> float:
        return _mean_std(self.val)[1]


@dataclass
class Lead:
    row: str
    leaders: List[str]  # co-leaders on validation (equal means), first is the one compared
    runner_up: Optional[str]
    val_margin: float
    test_difference: float  # leader's test mean - runner-up's test mean
    noise: float  # larger of the two validation seed stds
    test_leaders: List[str]

    @property
    def within_noise(self) -> bool:
        return self.val_margin < self.noise


def _config(record: Dict[str, Any]) -> Dict[str, Any]:
    if "config" in record:
        return record["config"]
    return {"family": "dense", "budget": 1.0, "seed": record.get("seed"), "workload": record.get("workload")}


def is_percent(records: Sequence[Dict[str, Any]]) -> bool:
    """Accuracy workloads are shown in %; other metrics (cosine similarity) as stored."""
    for r in records:
        if "test_metrics" in r:
            return "accuracy" in r["test_metrics"]
    return True


def cells(records: Sequence[Dict[str, Any]], scale: float, workload: Optional[str] = None
          ) -> Dict[Tuple[str, float], Cell]:
    """(family, budget) -> its trials' validation and test quality; a failed trial (``error``)
    is counted, not averaged."""
    out: Dict[Tuple[str, float], Cell] = {}
    for r in records:
        config = _config(r)
        if workload is not None and config.get("workload") not in (None, workload):
            continue
        cell = out.setdefault((config["family"], float(config["budget"])), Cell([], []))
        if "error" in r:
            cell.failed += 1
            continue
        if "val_quality" not in r:
            raise SystemExit(f"a {config['family']} trial at budget {config['budget']} has no val_quality")
        cell.val.append(scale * r["val_quality"])
        cell.test.append(scale * _test(r))
    return out


def lead(row: str, row_cells: Dict[str, Cell]) -> Optional[Lead]:
    ok = {f: c for f, c in row_cells.items() if c.val}
    if not ok:
        return None
    best = max(c.val_mean for c in ok.values())
    leaders = [f for f, c in ok.items() if best - c.val_mean <= TIE]  # more than one: a tie
    rest = {f: c for f, c in ok.items() if f not in leaders}
    test_best = max(c.test_mean for c in ok.values())
    test_leaders = [f for f, c in ok.items() if test_best - c.test_mean <= TIE]
    first = ok[leaders[0]]
    if not rest:
        return Lead(row, leaders, None, float("nan"), float("nan"), float("nan"), test_leaders)
    runner = max(rest, key=lambda f: rest[f].val_mean)
    second = rest[runner]
    return Lead(row, leaders, runner, first.val_mean - second.val_mean, first.test_mean - second.test_mean,
                max(first.val_std, second.val_std), test_leaders)


def _fmt(values: List[float], digits: int) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def cell_text(cell: Optional[Cell], bold: bool, digits: int) -> str:
    if cell is None:
        return "-"
    if not cell.val:
        return f"failed ({cell.failed})"
    val = _fmt(cell.val, digits)
    text = f"{'**' + val + '**' if bold else val} ({_fmt(cell.test, digits)})"
    if cell.failed:
        text += f" [{cell.failed} failed]"
    return text


def lead_text(item: Lead, digits: int) -> str:
    names = " = ".join(item.leaders)
    if item.runner_up is None:
        return f"- {item.row}: {names} alone"
    verb = "lead (tied on validation)" if len(item.leaders) > 1 else "leads"
    verdict = "within noise" if item.within_noise else "ahead"
    text = (f"- {item.row}: {names} {verb} on validation by {item.val_margin:+.{digits}f} over "
            f"{item.runner_up} (test {item.test_difference:+.{digits}f}); {verdict} "
            f"(larger validation std {item.noise:.{digits}f})")
    if set(item.test_leaders) != set(item.leaders):
        text += f"; test leader: {' = '.join(item.test_leaders)}"
    return text


def render(paths: Sequence[str], rows: str = "budget", labels: Optional[Sequence[str]] = None,
           dense_column: bool = False, workload: Optional[str] = None) -> Tuple[str, List[Lead]]:
    """The markdown table and lead lines for the given grid files, and the leads themselves."""
    loaded = [json.loads(Path(p).read_text()) for p in paths]
    names = list(labels) if labels else [Path(p).stem for p in paths]
    return render_grids(loaded, names, rows=rows, dense_column=dense_column, workload=workload)


def render_grids(loaded: Sequence[Dict[str, Any]], names: Sequence[str], rows: str = "budget",
                 dense_column: bool = False, workload: Optional[str] = None) -> Tuple[str, List[Lead]]:
    """:func:`render` of grids already read (``{"trials": [...]}`` each; ``names``: their row
    labels with ``rows="file"``)."""
    all_records = [r for d in loaded for r in d.get("trials", [])]
    percent = is_percent(all_records)
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    per_file = [cells(d.get("trials", []), scale, workload) for d in loaded]
    families = [f for f in FAMILY_ORDER if any(f == k[0] for c in per_file for k in c)]
    families += sorted({k[0] for c in per_file for k in c} - set(families) - {"dense"})
    if dense_column:
        families = ["dense", *families]
    table: Dict[str, Dict[str, Cell]] = {}
    if rows == "file":
        for name, file_cells in zip(names, per_file):
            row = {f: c for (f, _), c in file_cells.items()}
            table[name] = {f: row[f] for f in families if f in row}
    else:
        merged: Dict[Tuple[str, float], Cell] = {}
        for file_cells in per_file:  # the last file that has a cell gives it
            merged.update(file_cells)
        for budget in sorted({b for f, b in merged if f != "dense" or dense_column}):
            key = f"{budget:g}"
            row = {f: c for (f, b), c in merged.items() if b == budget}
            table[key] = {f: row[f] for f in families if f in row}
    unit = "%" if percent else ""
    lines = []
    if not dense_column and rows == "budget":
        dense = merged.get(("dense", 1.0))
        if dense is not None and dense.val:
            lines += [f"dense: validation {_fmt(dense.val, digits)}{unit} (test {_fmt(dense.test, digits)}{unit})", ""]
    if not families:  # dense trials only
        return "\n".join(lines), []
    lines.append(f"| {'budget' if rows == 'budget' else 'grid'} | " + " | ".join(families) + " |")
    lines.append("|---|" + "---|" * len(families))
    leads = []
    for name, row_cells in table.items():
        item = lead(name, row_cells)
        winners = set(item.leaders) if item else set()
        if item:
            leads.append(item)
        lines.append(f"| {name} | " + " | ".join(
            cell_text(row_cells.get(f), f in winners, digits) for f in families) + " |")
    lines.append("")
    lines += [lead_text(item, digits) for item in leads]
    return "\n".join(lines) + "\n", leads


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="grid JSON files (bench/workloads.py's PREFIX.json)")
    parser.add_argument("--rows", choices=("budget", "file"), default="budget",
                        help="one row per budget (files merged) or one row per file")
    parser.add_argument("--label", action="append", default=[],
                        help="row label of each file with --rows file, in order")
    parser.add_argument("--dense-column", action="store_true", help="dense as a column that can lead")
    parser.add_argument("--workload", help="only records of this workload (files holding several)")
    args = parser.parse_intermixed_args(argv)
    if args.label and len(args.label) != len(args.files):
        parser.error(f"{len(args.label)} --label for {len(args.files)} files")
    text, _ = render(args.files, rows=args.rows, labels=args.label or None,
                     dense_column=args.dense_column, workload=args.workload)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
