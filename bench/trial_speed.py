"""Whole trials' training time, this checkout against an earlier commit, side by side.

    .venv/bin/python -m bench.trial_speed --base 0d26662            # prints a table, writes JSON
    .venv/bin/python -m bench.trial_speed --base HEAD~3 --repeats 5 --only digits

Each trial runs in a fresh process (1 torch thread, float32, CPU) with ``PYTHONPATH`` on one of
the two trees: this checkout, or a temporary ``git worktree`` of ``--base``.  For every trial
configuration the two trees alternate, and which goes first is swapped on every repeat, so a
machine drifting faster or slower favours neither.  The time is the trial's ``train_seconds``
(its training loop: steps, the budget controller and per-epoch validation; not the dense model's
training, the data loading before it, or export).  The test quality of both trees is compared
too: a change meant to be a speed-up only should leave it equal.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRIALS = {
    "digits-mlp fine-tune, GBLR 0.3, 20 epochs": dict(
        workload="digits-mlp", family="gblr", mode="finetune", epochs=20, batch_size=64, lr=0.002, budget=0.3),
    "digits-mlp fine-tune, dense, 20 epochs": dict(
        workload="digits-mlp", family="dense", mode="finetune", epochs=20, batch_size=64, lr=0.002),
    "digits-mlp scratch, GBLR 0.3, 10 epochs": dict(
        workload="digits-mlp", family="gblr", mode="scratch", epochs=10, budget=0.3),
    "animal-mnist-mixer scratch, GBLR 0.3, 3 epochs": dict(
        workload="animal-mnist-mixer", family="gblr", mode="scratch", epochs=3, budget=0.3),
    "animal-mnist-mixer scratch, dense, 3 epochs": dict(
        workload="animal-mnist-mixer", family="dense", mode="scratch", epochs=3),
    "animal-mnist-mixer fine-tune, GBLR 0.3, 3 epochs": dict(
        workload="animal-mnist-mixer", family="gblr", mode="finetune", epochs=3, budget=0.3),
    "animal-mnist-mixer fine-tune, dense, 3 epochs": dict(
        workload="animal-mnist-mixer", family="dense", mode="finetune", epochs=3),
}

# what each process runs: one trial, its training time and test quality
_ONE = """
import json, sys, tempfile, torch
torch.set_num_threads(1)
import gsmsearch
from gsmsearch.trainer import TrialConfig, run_trial
config, cache = json.loads(sys.argv[1]), sys.argv[2]
with tempfile.TemporaryDirectory() as checkpoints:
    result = run_trial(TrialConfig(measure_latency=False, **config), cache_dir=cache, checkpoint_dir=checkpoints)
print("RESULT " + json.dumps({"train_s": result.train_seconds, "quality": result.quality,
                              "package": gsmsearch.__file__}))
"""


def _trial(tree: Path, config: dict, cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", _ONE, json.dumps(config), cache], env=env, cwd=tree,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"trial failed in {tree}: {done.stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if not result["package"].startswith(str(tree)):  # the tree's code ran, not the installed one
        raise RuntimeError(f"expected gsmsearch from {tree}, got {result['package']}")
    return result


def run(base: str, repeats: int, only: str) -> dict:
    trials = {name: config for name, config in TRIALS.items() if only in name}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base_tree), base], cwd=ROOT, check=True)
        base_commit = subprocess.run(["git", "rev-parse", "--short", base], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout.strip()
        trees = {f"base ({base_commit})": base_tree, "this checkout": ROOT}
        cache = str(Path(tmp) / "cache")  # dense models trained once per tree, outside the timing
        results = {name: {tree: [] for tree in trees} for name in trials}
        try:
            for repeat in range(repeats + 1):  # repeat 0 warms the caches and is not counted
                order = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
                for name, config in trials.items():
                    for tree in order:
                        result = _trial(trees[tree], config, cache)
                        if repeat:
                            results[name][tree].append(result)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    rows = []
    (base_name, now_name) = trees
    for name in trials:
        before, now = results[name][base_name], results[name][now_name]
        b, n = (statistics.median(r["train_s"] for r in rs) for rs in (before, now))
        rows.append({"trial": name, "base_s": b, "now_s": n, "ratio": n / b,
                     "same_quality": sorted({r["quality"] for r in before}) == sorted({r["quality"] for r in now}),
                     "quality": sorted({r["quality"] for r in now}), "runs": results[name]})
    return {"base": base_commit, "repeats": repeats, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="only the trials whose name contains this")
    parser.add_argument("--out", default="bench/results/trial-speed.json")
    args = parser.parse_args(argv)
    from ._timing import machine_info

    report = {"machine": machine_info(), "command": " ".join([sys.executable, "-m", "bench.trial_speed"]
                                                             + (argv or sys.argv[1:])),
              **run(args.base, args.repeats, args.only)}
    print(f"# {report['machine']['cpu']} | 1 torch thread | float32 | median of {args.repeats}, alternating")
    print(f"| trial | {report['base']} s | this checkout s | ratio | same test quality |")
    print("|---|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['trial']} | {row['base_s']:.2f} | {row['now_s']:.2f} | {row['ratio']:.2f} | "
              f"{'yes' if row['same_quality'] else 'NO'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
