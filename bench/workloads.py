"""Grid benchmark: dense vs GBLR vs the hand-crafted structured families at fixed FLOP budgets.

For one workload and mode, trains dense plus every (family, budget, seed) with
``gsmsearch.trainer.run_trial`` (same epochs for all, latency not measured), then prints and
writes a markdown report (mean +- sample std of test accuracy over seeds, achieved structured
relative FLOPs) and a JSON file with every trial's config and result scalars.

Usage (the digits-mlp grid of bench/RESULTS.md)::

    .venv/bin/python bench/workloads.py --workload digits-mlp --mode finetune --epochs 10 \
        --budgets 0.1 0.2 0.3 0.5 --seeds 0 1 2 --jobs 2 --out bench/results/workloads-digits-mlp

``--set KEY=VALUE`` overrides a TrialConfig field for the structured trials (VALUE parsed as
JSON when it can be, e.g. ``--set structure_lr=0.01 --set lam=0.01``); with ``--families gblr
--no-dense`` that is a GBLR-variant run.  ``--dense-set KEY=VALUE`` does the same for the dense
trials (e.g. ``--dense-set distill=0.5``: the dense model self-distilled, in the same report).  Fine-tune trials start from a dense model trained once
per seed and cached under ``--cache-dir`` (default bench/results/.cache/workloads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "bench" / "results" / ".cache" / "workloads"
SCALARS = (
    "quality", "val_quality", "test_quality", "test_metrics", "flops_per_sample", "dense_flops_per_sample",
    "relative_flops", "relative_linear_flops", "structured_relative_flops", "params",
    "dense_params", "train_seconds", "epochs_run", "layers",
)


# -- workers -------------------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_one(config: Dict[str, Any], cache_dir: str) -> Dict[str, Any]:
    from gsmsearch.trainer import TrialConfig, TrialFailed, run_trial

    started = time.perf_counter()
    record: Dict[str, Any] = {"config": config}
    try:
        result = run_trial(TrialConfig.from_dict(config), cache_dir=Path(cache_dir))
        data = result.to_dict()
        record.update({k: data[k] for k in SCALARS})
        record["layers"] = {  # the per-component intervals are bulky: keep the summary only
            name: {k: v for k, v in layer.items() if k != "intervals"} for name, layer in data["layers"].items()
        }
        record["final_train_loss"] = result.curves[-1]["train_loss"] if result.curves else None
    except TrialFailed as error:
        record["error"] = f"TrialFailed: {error.reason}"
    except Exception as error:  # noqa: BLE001 - a benchmark records failures and goes on
        record["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"
    record["wall_seconds"] = time.perf_counter() - started
    return record


def _dense_start_quality(workload_name: str, options: Dict[str, Any], seed: int, cache_dir: str) -> Dict[str, float]:
    """Test/val accuracy of the cached pre-trained dense model (the fine-tune starting point)."""
    from gsmsearch.trainer import dense_state
    from gsmsearch.workloads import get_workload

    workload = get_workload(workload_name, **options)
    model = workload.build_model()
    model.load_state_dict(dense_state(workload, seed=seed, cache_dir=Path(cache_dir)))
    model.eval()
    splits = workload.load_data(seed=seed)
    evaluate = lambda split: workload.evaluate(model, splits[split], collate_fn=splits.collate_fn)
    return {"seed": seed, "val_quality": float(evaluate("val")["quality"]),
            "test_quality": float(evaluate("test")["quality"])}


# -- helpers -------------------------------------------------------------------------------------
def _test(record: Dict[str, Any]) -> float:
    """A record's test accuracy: ``test_quality``; files written when a trial's ``quality`` was its
    test metric have no ``test_quality`` and hold it under ``quality``."""
    return record["test_quality"] if "test_quality" in record else record["quality"]


def _parse_set(items: List[str]) -> Dict[str, Any]:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _machine() -> Dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _key(config: Dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _mean_std(values: List[float]) -> tuple:
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _val_test(records) -> str:
    """Validation and test accuracy (%) of ``records``: mean ± sample std, and each seed's test."""
    val, test = _mean_std([100 * r["val_quality"] for r in records]), _mean_std([100 * _test(r) for r in records])
    return (f"validation {val[0]:.2f} ± {val[1]:.2f}, test {test[0]:.2f} ± {test[1]:.2f} "
            f"(test per seed: {_per_seed(records)})")


def _per_seed(records) -> str:
    return ", ".join(f"s{r['seed'] if 'seed' in r else r['config']['seed']}={100 * _test(r):.2f}" for r in records)


# -- report --------------------------------------------------------------------------------------
def render(meta: Dict[str, Any], records: List[Dict[str, Any]], dense_start: List[Dict[str, Any]]) -> str:
    lines = [
        f"# Structured-family grid: {meta['workload']} ({meta['mode']})",
        "",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch "
        f"{meta['machine']['torch']}, python {meta['machine']['python']} "
        f"({meta['jobs']} worker processes x 1 torch thread)",
        f"- workload: {meta['workload']} {json.dumps(meta['workload_options']) if meta['workload_options'] else ''}".rstrip(),
        f"- mode: {meta['mode']}; epochs: {meta['epochs']} (all trials, dense included); dtype: float32; "
        f"device: cpu",
        f"- seeds: {' '.join(map(str, meta['seeds']))} (cells: mean ± sample std over seeds, "
        f"accuracy in %)",
        f"- overrides: {json.dumps(meta['overrides']) if meta['overrides'] else 'none (TrialConfig defaults)'}",
        f"- dense overrides: {json.dumps(meta['dense_overrides']) if meta.get('dense_overrides') else 'none'}",
        f"- split sizes (seed {meta['seeds'][0]}): {meta.get('split_sizes', '?')}; one test example = "
        f"{100 / meta['split_sizes']['test']:.2f} pts" if meta.get("split_sizes") else "- split sizes: ?",
        f"- command: `{meta['command']}`",
        f"- wall time of the grid: {meta.get('wall_seconds', float('nan')):.0f} s "
        f"({meta.get('trials', 0)} trials)",
        "",
    ]
    dense = [r for r in records if r["config"]["family"] == "dense"]
    dense_ok = [r for r in dense if "error" not in r]
    if dense:
        what = (f"{meta['epochs']} more epochs from the pre-trained dense model" if meta["mode"] == "finetune"
                else f"scratch, {meta['epochs']} epochs")
        lines.append(f"**dense** ({what}): {_val_test(dense_ok)}")
    if dense_start:
        lines.append(f"\n**dense pre-trained** (the cached fine-tune start point, workload default recipe): "
                     f"{_val_test(dense_start)}")
    from bench.accuracy_tables import render_grids  # it reads this module's helpers

    table, _ = render_grids([{"trials": records}], [meta["workload"]])
    lines += ["", "Accuracy (%): validation (test in brackets), mean ± sample std over seeds; each row's "
              "leader chosen on validation, bold; below, its margin over the runner-up:", "", table.rstrip()]
    over = [
        f"{r['config']['family']}@{r['config']['budget']} s{r['config']['seed']}: "
        f"f={r['structured_relative_flops']:.3f}"
        for r in records
        if "error" not in r and r["config"]["family"] != "dense"
        and r["structured_relative_flops"] > 1.05 * float(r["config"]["budget"])
    ]
    if over:
        lines += ["", "Trials over budget by > 5% (family cannot hit the budget exactly): " + "; ".join(over)]
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Failed trials:", ""]
        for r in errors:
            lines.append(
                f"- {r['config']['family']}@{r['config']['budget']} seed {r['config']['seed']}: "
                f"{r['error'].splitlines()[0]}"
            )
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    from gsmsearch.structured import family_names

    all_families = [f for f in family_names() if f != "dense"]
    order = ["gblr"] + [f for f in ("lowrank", "blockdiag", "monarch", "blocksparse", "blocklowrank", "blast")
                        if f in all_families]
    order += [f for f in all_families if f not in order]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="digits-mlp")
    parser.add_argument("--workload-options", default="{}", help="JSON object of workload options")
    parser.add_argument("--mode", choices=("scratch", "finetune"), default="finetune")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--families", nargs="+", default=order, help=f"of {order}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense trials")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="TrialConfig override for the structured trials (repeatable)")
    parser.add_argument("--dense-set", dest="dense_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="TrialConfig override for the dense trials (repeatable)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "workloads"),
                        help="output prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render PREFIX.md from PREFIX.json without running anything")
    parser.add_argument("--resume", action="store_true",
                        help="reuse successful trials with identical configs from PREFIX.json")
    args = parser.parse_args(argv)

    if args.report_only:
        saved = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(render(saved["meta"], saved["trials"], saved.get("dense_pretrained", [])))
        print(f"wrote {args.out}.md")
        return 0
    unknown = [f for f in args.families if f not in all_families]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {all_families}")
    overrides = _parse_set(args.overrides)
    dense_overrides = _parse_set(args.dense_overrides)
    workload_options = json.loads(args.workload_options)
    base = {
        "workload": args.workload, "workload_options": workload_options, "mode": args.mode,
        "epochs": args.epochs, "measure_latency": False, "device": "cpu",
    }
    configs = []
    # slowest first (GBLR), so the pool's tail is short
    for family in args.families:
        for budget in args.budgets:
            for seed in args.seeds:
                configs.append({**base, **overrides, "family": family, "budget": budget, "seed": seed})
    if not args.no_dense:
        configs += [{**base, **dense_overrides, "family": "dense", "budget": 1.0, "seed": seed}
                    for seed in args.seeds]
    from gsmsearch.trainer import TrialConfig

    configs = [TrialConfig.from_dict(c).to_dict() for c in configs]  # validate + normalise

    out_json = Path(args.out + ".json")
    out_md = Path(args.out + ".md")
    previous = {}
    previous_meta: Dict[str, Any] = {}
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        previous_meta = old.get("meta", {})
        for r in old.get("trials", []):
            if "error" not in r:
                previous[_key(r["config"])] = r
    meta = {
        "workload": args.workload, "workload_options": workload_options, "mode": args.mode,
        "epochs": args.epochs, "budgets": args.budgets, "families": args.families,
        "seeds": args.seeds, "jobs": args.jobs, "overrides": overrides,
        "dense_overrides": dense_overrides, "dtype": "float32",
        "machine": _machine(),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/workloads.py", *sys.argv[1:]]),
    }
    try:
        from gsmsearch.workloads import get_workload

        splits = get_workload(args.workload, **workload_options).load_data(seed=args.seeds[0])
        meta["split_sizes"] = {name: len(splits[name]) for name in ("train", "val", "test")}
    except Exception:  # noqa: BLE001 - informational only
        pass
    records: List[Dict[str, Any]] = []
    todo = []
    for c in configs:
        if _key(c) in previous:
            records.append(previous[_key(c)])
        else:
            todo.append(c)
    print(f"{len(configs)} trials ({len(todo)} to run) with {args.jobs} workers", flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def save(dense_start=()):
        meta["trials"] = len(records)
        out_json.write_text(json.dumps(
            {"meta": meta, "dense_pretrained": list(dense_start), "trials": records}, indent=1, default=str
        ))

    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        futures = [pool.submit(_run_one, c, args.cache_dir) for c in todo]
        for done, future in enumerate(as_completed(futures), 1):
            r = future.result()
            records.append(r)
            c = r["config"]
            status = (f"FAILED {r['error'].splitlines()[0]}" if "error" in r else
                      f"test {_test(r):.4f} val {r['val_quality']:.4f} "
                      f"f={r['structured_relative_flops']:.3f} {r['train_seconds']:.1f}s")
            print(f"[{done}/{len(todo)} {time.perf_counter() - started:6.0f}s] {c['family']:12s} "
                  f"budget={c['budget']:<4} seed={c['seed']}: {status}", flush=True)
            save()
        dense_start = []
        if args.mode == "finetune":
            futures = [pool.submit(_dense_start_quality, args.workload, workload_options, s, args.cache_dir)
                       for s in args.seeds]
            dense_start = [f.result() for f in futures]
    meta["wall_seconds"] = time.perf_counter() - started
    if previous:  # a resumed run: the earlier runs' commands and time count too
        meta["wall_seconds"] += float(previous_meta.get("wall_seconds", 0.0))
        meta["command"] = " ; ".join([previous_meta.get("command", "?"), meta["command"] + "  # resumed"])
    order_key = lambda r: (r["config"]["family"], r["config"]["budget"], r["config"]["seed"])
    records.sort(key=order_key)
    save(dense_start)
    report = render(meta, records, dense_start)
    out_md.write_text(report)
    print()
    print(report)
    print(f"wrote {out_json} and {out_md}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
