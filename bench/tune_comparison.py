"""The same fixed workload through Ray Tune (Tuner, function trainable, reuse_actors) and
through gsmsearch's driver (Optuna ask/tell on reused Ray actors), measured side by side.

    .venv/bin/python -m bench.tune_comparison        # writes bench/results/tune_comparison.json

Both run 8 distinct trials (digits-mlp, low-rank at budget 0.25, one seed per trial) with 2
concurrent trials on a local Ray started once beforehand.  The Tune run records nothing in an
Optuna database (a lower bound on what a Tune-based searcher would cost); gsmsearch's run
records everything it always records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _tune(trials: int, epochs: int, tmp: str) -> float:
    from ray import tune

    def trainable(config):
        import torch

        from gsmsearch.trainer import TrialConfig, run_trial

        torch.set_num_threads(1)
        result = run_trial(TrialConfig(workload="digits-mlp", family="lowrank", budget=0.25,
                                       epochs=epochs, batch_size=64, lr=0.003, seed=config["seed"]),
                           cache_dir=os.path.join(tmp, "cache"))
        tune.report({"quality": result.quality, "relative_flops": result.relative_flops})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name="tune-bench", storage_path=os.path.join(tmp, "tune"), verbose=0),
    )
    begin = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - begin
    assert len(results) == trials and not results.errors, results.errors
    return wall


def _gsmsearch(trials: int, epochs: int, tmp: str) -> float:
    from gsmsearch.search import launch

    from .orchestration import _spec

    path = Path(tmp) / "g.yaml"
    path.write_text(yaml.safe_dump(_spec("g", trials, 2, epochs)))
    begin = time.perf_counter()
    summary = launch(path, out=open(os.devnull, "w"), status_interval=1e9)
    wall = time.perf_counter() - begin
    assert summary.completed == trials
    return wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default="bench/results/tune_comparison.json")
    args = parser.parse_args(argv)
    from gsmsearch.search._runner import start_ray

    from ._timing import machine_info

    start_ray(None, num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: data files, dense cache, imports
        _gsmsearch(2, 1, tmp)
        tune_wall = _tune(args.trials, args.epochs, tmp)
        ours_wall = _gsmsearch(args.trials, args.epochs, tmp + "/o") if os.makedirs(tmp + "/o") is None else 0
    report = {"machine": machine_info(), "trials": args.trials, "epochs": args.epochs,
              "tune_wall_s": tune_wall, "gsmsearch_wall_s": ours_wall,
              "tune_over_gsmsearch": tune_wall / ours_wall}
    print(f"8 trials x {args.epochs} epochs, 2 concurrent: Ray Tune {tune_wall:.1f} s, "
          f"gsmsearch driver {ours_wall:.1f} s ({tune_wall / ours_wall:.2f}x)")
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
