"""Early stopping: the same study with and without a pruner, over sampler seeds.

    .venv/bin/python -m bench.pruning                  # writes bench/results/pruning.json
    .venv/bin/python -m bench.pruning --quick          # digits, 2 seeds, small: a smoke run

The study (28x28 Animal-MNIST, a one-block Mixer of width 32; low-rank layers at budgets 0.15,
0.2, 0.3 and 0.45, the learning rate sampled log-uniformly in [1e-4, 0.1], TPE, 9 epochs a
trial, 16 trials, 2 at a time) runs once with ``pruner: none`` and once with ``asha``
(min_epochs 1, reduction_factor 3, min_trials 2, cost_factor 1.5; ``--min-trials`` and
``--reduction-factor`` change those), for each sampler seed.  Per
launch: the final hypervolume of the validation front (quality vs relative FLOPs, reference
point (0, 1)), the trial epochs spent (a complete trial's epochs, a pruned trial's epochs before
it stopped), the trials complete / pruned / failed, and the wall time.  Reported: per seed, the
hypervolume with pruning over without and the epochs with pruning over without.  The pruned
study asks for the same number of trials; it spends fewer epochs on them, it does not get more
trials for the epochs saved.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def spec(name: str, seed: int, pruner: dict, *, quick: bool, trials: int, epochs: int, concurrency: int) -> dict:
    if quick:
        workload = {"name": "digits-mlp", "options": {"hidden_sizes": [32, 32]}, "batch_size": 16}
    else:
        workload = {"name": "animal-mnist-mixer", "options": {"dim": 32, "depth": 1}}
    return {
        "name": name,
        "workload": {**workload, "epochs": epochs},
        "families": {"lowrank": {"budget": [0.15, 0.2, 0.3, 0.45], "lr": {"low": 1e-4, "high": 0.1, "log": True}}},
        "sampler": {"name": "tpe", "seed": seed},
        "trials": trials,
        "concurrency": concurrency,
        "resources": {"cpus_per_trial": 1},
        "pruner": pruner,
    }


def epochs_spent(trial) -> int:
    """Epochs a trial trained: a complete trial's, a pruned one's before it stopped, a failed
    one's reported epochs; a repeated configuration (never run) none."""
    attrs = trial.user_attrs
    if "duplicate_of" in attrs:
        return 0
    if trial.state.name == "COMPLETE":
        return int(attrs["result"]["epochs_run"])
    if isinstance(attrs.get("pruned"), dict):
        return int(attrs["pruned"].get("stopped_after_epoch") or len(attrs.get("epoch_quality") or []))
    return len(attrs.get("epoch_quality") or [])


def run_one(folder: Path, name: str, body: dict) -> dict:
    import optuna

    from gsmsearch.search import launch
    from gsmsearch.search._study import study_hypervolume, study_records

    begin = time.perf_counter()
    launch(body, base_dir=folder, out=open(os.devnull, "w"), status_interval=1e9)
    wall = time.perf_counter() - begin
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / (name + '.db')}")
    trials = study.get_trials()
    records = study_records(study)
    states = [t.state.name for t in trials if "duplicate_of" not in t.user_attrs]
    return {
        "hypervolume": study_hypervolume(records, ["quality", "relative_flops"], ["maximize", "minimize"]),
        "epochs": sum(epochs_spent(t) for t in trials),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        # epochs pruned trials trained after the epoch they were judged at (0: each stopped there)
        "epochs_after_decision": sum(int(t.user_attrs["pruned"].get("stopped_after_epoch") or 0)
                                     - int(t.user_attrs["pruned"]["epoch"])
                                     for t in trials if isinstance(t.user_attrs.get("pruned"), dict)),
        "wall_s": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--min-trials", type=int, default=2, help="the pruner's min_trials")
    parser.add_argument("--reduction-factor", type=int, default=3, help="the pruner's reduction_factor")
    parser.add_argument("--quick", action="store_true", help="digits-mlp, 2 seeds, 6 trials of 4 epochs")
    parser.add_argument("--out", default="bench/results/pruning.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.trials, args.epochs = args.seeds[:2], 6, 4
    asha = {"name": "asha", "min_epochs": 1, "reduction_factor": args.reduction_factor,
            "min_trials": args.min_trials, "cost_factor": 1.5}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsmsearch-pruning-") as tmp:
        for index, seed in enumerate(args.seeds):
            variants = [("none", {"name": "none"}), ("asha", asha)]
            if index % 2:  # alternate which goes first, so the machine's drift favours neither
                variants.reverse()
            row = {"seed": seed}
            for label, pruner in variants:
                name = f"pruning-{label}-{seed}"
                body = spec(name, seed, pruner, quick=args.quick, trials=args.trials, epochs=args.epochs,
                            concurrency=args.concurrency)
                row[label] = run_one(Path(tmp), name, body)
                print(f"seed {seed} pruner {label}: {json.dumps(row[label])}", flush=True)
            row["hypervolume_ratio"] = row["asha"]["hypervolume"] / row["none"]["hypervolume"]
            row["epochs_ratio"] = row["asha"]["epochs"] / row["none"]["epochs"]
            rows.append(row)
    report = {
        "spec": spec("pruning-SEED", 0, asha, quick=args.quick, trials=args.trials, epochs=args.epochs,
                     concurrency=args.concurrency),
        "rows": rows,
        "median_hypervolume_ratio": statistics.median(r["hypervolume_ratio"] for r in rows),
        "median_epochs_ratio": statistics.median(r["epochs_ratio"] for r in rows),
    }
    print("| seed | hypervolume none / asha | ratio | epochs none / asha | ratio | pruned | wall s none / asha |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['none']['hypervolume']:.4f} / {r['asha']['hypervolume']:.4f} | "
              f"{r['hypervolume_ratio']:.3f} | {r['none']['epochs']} / {r['asha']['epochs']} | "
              f"{r['epochs_ratio']:.3f} | {r['asha']['pruned']} of {args.trials} | "
              f"{r['none']['wall_s']:.0f} / {r['asha']['wall_s']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
