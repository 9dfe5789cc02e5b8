"""Early stopping: the same study with and without a pruner, over sampler seeds.

    .venv/bin/python -m bench.pruning                  # writes bench/results/pruning.json
    .venv/bin/python -m bench.pruning --quick          # digits, 2 seeds, small: a smoke run
    .venv/bin/python -m bench.pruning --baseline bench/results/pruning.json --cost-factor 2 \
        --out bench/results/pruning-cost-factor-2.json # reuses the runs without a pruner
    .venv/bin/python -m bench.pruning --replay bench/results/pruning.json \
        --out bench/results/pruning-replay.json        # a grid of settings over recorded curves
    .venv/bin/python -m bench.pruning --trials 32 --pruner none \
        --out bench/results/pruning-32-trials.json     # only the runs without a pruner, 32 trials

The study (28x28 Animal-MNIST, a one-block Mixer of width 32; low-rank layers at budgets 0.15,
0.2, 0.3 and 0.45, the learning rate sampled log-uniformly in [1e-4, 0.1], TPE, 9 epochs a
trial, 16 trials, 2 at a time) runs once with ``pruner: none`` and once with a pruner (default
asha, min_epochs 1, reduction_factor 3, min_trials 2, cost_factor 1.5; ``--pruner``,
``--min-epochs``, ``--reduction-factor``, ``--min-trials`` and ``--cost-factor`` change those),
for each sampler seed.  The runs without a pruner do not depend on the pruner's setting:
``--baseline FILE`` takes them from another result file of the same spec (checked; the
result's ``baseline`` names the file) and runs only the pruned side; ``--pruner none`` runs only
them (a file for ``--baseline`` and ``--replay``).  ``--trials`` changes the study's size.  The
result file is written after every seed.  Per launch: the final
hypervolume of the validation front (quality vs relative FLOPs, reference point (0, 1)), the
trial epochs spent (a complete trial's epochs, a pruned trial's epochs before it stopped), the
trials complete / pruned / failed, the wall time, and per trial its budget, learning rate,
state, validation curve and values.  Reported: per seed, the hypervolume with pruning over
without and the epochs with pruning over without.  The pruned study asks for the same number of
trials; it spends fewer epochs on them, it does not get more trials for the epochs saved.

``--replay FILE`` trains nothing: it replays a grid of pruner settings (rule, min_epochs,
reduction_factor, min_trials, cost_factor, and two rule variants) over the curves of the runs
without a pruner in FILE, with the trial sequence held fixed (see :func:`replay`), and writes
which settings meet both targets (at least 95% of the hypervolume, at most 50% of the epochs)
on every seed, and the settings no other beats on both worst-seed ratios.
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


def trial_rows(trials) -> list:
    """Per trial: its budget, learning rate, state, validation curve (epoch, quality), final
    values and where it was stopped: enough to replay other pruner settings over the curves."""
    from gsmsearch.search._pruning import curve_from_attrs

    rows = []
    for t in trials:
        curve = curve_from_attrs(t.number, t.user_attrs)
        config = t.user_attrs.get("config") or {}
        pruned = t.user_attrs.get("pruned")
        rows.append({"number": t.number, "digest": t.user_attrs.get("config_digest"),
                     "state": t.state.name, "budget": config.get("budget"),
                     "lr": config.get("lr"), "duplicate_of": t.user_attrs.get("duplicate_of"),
                     "values": list(t.values) if t.values is not None else None,
                     "curve": curve.as_list() if curve is not None else [],
                     "pruned_at": pruned.get("epoch") if isinstance(pruned, dict) else None})
    return rows


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
        "trials": trial_rows(trials),
    }


def comparable_spec(body: dict) -> dict:
    """A benchmark spec without what differs between its two launches (name, pruner)."""
    return {key: value for key, value in body.items() if key not in ("name", "pruner")}


def load_baseline(path: str, expected: dict, seeds) -> dict:
    """The ``pruner: none`` launches of another result file, by seed: they do not depend on
    the pruner, so a setting can be measured against them without running them again.  The
    file's spec must equal this run's (but for the pruner) and hold every seed asked for."""
    report = json.loads(Path(path).read_text())
    if comparable_spec(report["spec"]) != comparable_spec(expected):
        raise SystemExit(f"--baseline {path}: its spec differs from this run's (pruner aside): "
                         f"{json.dumps(comparable_spec(report['spec']))}")
    rows = {row["seed"]: row["none"] for row in report["rows"]}
    missing = [seed for seed in seeds if seed not in rows]
    if missing:
        raise SystemExit(f"--baseline {path}: no run without a pruner for seed(s) {missing}")
    return rows


# -- replay: other pruner settings over the curves of the runs without a pruner ------------------

def replay(trials: list, pruner, *, epochs: int, concurrency: int) -> dict:
    """Run the trials of a launch without a pruner again, on paper, under ``pruner``: every epoch
    takes one time unit, ``concurrency`` trials run at a time, started in trial-number order; at
    each epoch the pruner decides (``Pruner.decide``, as the driver calls it) against the curves
    reported so far, and a stopped trial frees its slot.  The trial sequence is held fixed (a
    live study's sampler would propose differently after the first trials it learns from)."""
    import heapq

    from gsmsearch.search._pareto import hypervolume_2d, pareto_front
    from gsmsearch.search._pruning import TrialCurve

    queue = [t for t in trials if t["state"] == "COMPLETE" and t["duplicate_of"] is None and t["curve"]]
    curves, spent, complete, events = {}, {}, [], []

    def start(at: float) -> None:
        trial = queue.pop(0)
        # hyperband draws a trial's bracket from its configuration digest (in a file without digests: its number)
        curves[trial["number"]] = TrialCurve(trial["number"], "lowrank", float(trial["budget"]), "w",
                                             trial.get("digest") or str(trial["number"]))
        heapq.heappush(events, (at + 1, trial["number"], 1, trial))

    for _ in range(min(concurrency, len(queue))):
        start(0.0)
    while events:
        at, number, epoch, trial = heapq.heappop(events)
        curve = curves[number]
        curve.qualities[epoch] = dict((int(e), q) for e, q in trial["curve"])[epoch]
        spent[number] = epoch
        stop = pruner.decide(curve, epoch, [c for n, c in curves.items() if n != number])
        if stop is None and epoch < epochs:
            heapq.heappush(events, (at + 1, number, epoch + 1, trial))
            continue
        if stop is None:
            complete.append(trial["values"])
        if queue:
            start(at)
    directions = ["maximize", "minimize"]
    front = [complete[i] for i in pareto_front(complete, directions)] if complete else []
    return {"hypervolume": hypervolume_2d(front, directions, [0.0, 1.0]) if front else 0.0,
            "epochs": sum(spent.values()), "complete": len(complete)}


class _Revisit:
    """A rule variant (replay only): a rung a trial passed because fewer than ``min_trials``
    comparable trials had reached it is judged again at its later epochs, once they have."""

    def __init__(self, pruner) -> None:
        self.pruner, self.judged = pruner, set()

    def decide(self, curve, epoch, others):
        if epoch >= self.pruner.epochs:
            return None
        for rung in [r for r in self.pruner.rungs(curve) if r <= epoch and (curve.number, r) not in self.judged]:
            if len(self.pruner.peers(curve, rung, others)) >= self.pruner.min_trials:
                self.judged.add((curve.number, rung))
                decision = self.pruner.decide(curve, rung, others)
                if decision is not None:
                    return decision
        return None


def _cheaper_peers_only(pruner):
    """A rule variant (replay only): a trial is compared only with comparable trials that cost no
    more than it does (a trial behind a cheaper one is dominated; behind a dearer one it is not)."""
    peers = pruner.peers
    pruner.peers = lambda curve, epoch, others: [o for o in peers(curve, epoch, others)
                                                  if o.cost <= curve.cost * (1 + 1e-12)]
    return pruner


def hindsight(trials: list, *, epochs: int, concurrency: int, keep: float = 0.95) -> dict:
    """The fewest epochs that keep ``keep`` of the hypervolume, decided with hindsight: the
    smallest-cost set of trials that keeps it runs in full, so do the first ``concurrency``
    trials (no other trial starts before one ends), every other trial stops after epoch 1."""
    import itertools

    from gsmsearch.search._pareto import hypervolume_2d, pareto_front

    directions = ["maximize", "minimize"]

    def volume(points):
        return hypervolume_2d([points[i] for i in pareto_front(points, directions)], directions, [0.0, 1.0])

    done = [t for t in trials if t["state"] == "COMPLETE" and t["duplicate_of"] is None and t["curve"]]
    target = keep * volume([t["values"] for t in done])
    first = set(range(min(concurrency, len(done))))
    best = None
    for size in range(1, len(done) + 1):
        if best is not None and size > len(best["full"]):  # runs more trials in full than the best found
            break
        for chosen in itertools.combinations(range(len(done)), size):
            if volume([done[i]["values"] for i in chosen]) >= target:
                full = first | set(chosen)
                spent = epochs * len(full) + (len(done) - len(full))
                if best is None or spent < best["epochs"]:
                    best = {"epochs": spent, "full": sorted(done[i]["number"] for i in full)}
    return best


def replay_grid(path: str, out: str) -> int:
    """Replay a grid of pruner settings over the runs without a pruner in ``path`` (a result file
    of this benchmark, which records every trial's curve) and write which settings keep at least
    95% of the hypervolume for at most 50% of the epochs on every seed."""
    import itertools

    from gsmsearch.search._pruning import Pruner

    report = json.loads(Path(path).read_text())
    body = report["spec"]
    epochs, concurrency = body["workload"]["epochs"], body["concurrency"]
    settings = []
    for name, min_epochs, factor, min_trials, cost_factor, variant in itertools.product(
            ("asha", "hyperband", "median"), (1, 2, 3), (2, 3, 4), (1, 2, 3), (1.0, 1.5, 2.0, 3.0, 100.0),
            ("as implemented", "rung judged again once min_trials reached it", "cheaper peers only")):
        if min_epochs >= epochs or (name == "median" and factor != 3):
            continue
        setting = {"name": name, "min_epochs": min_epochs, "min_trials": min_trials, "cost_factor": cost_factor,
                   "variant": variant, **({} if name == "median" else {"reduction_factor": factor})}
        seeds = []
        for row in report["rows"]:
            pruner = Pruner(name, epochs=epochs, min_epochs=min_epochs, reduction_factor=factor,
                            min_trials=min_trials, cost_factor=cost_factor)
            if variant == "cheaper peers only":
                pruner = _cheaper_peers_only(pruner)
            elif variant != "as implemented":
                pruner = _Revisit(pruner)
            result = replay(row["none"]["trials"], pruner, epochs=epochs, concurrency=concurrency)
            none = row["none"]
            seeds.append({"seed": row["seed"], "hypervolume_ratio": result["hypervolume"] / none["hypervolume"],
                          "epochs_ratio": result["epochs"] / none["epochs"], "complete": result["complete"]})
        setting["seeds"] = seeds
        setting["worst_hypervolume_ratio"] = min(s["hypervolume_ratio"] for s in seeds)
        setting["worst_epochs_ratio"] = max(s["epochs_ratio"] for s in seeds)
        settings.append(setting)
    meeting = [s for s in settings if s["worst_hypervolume_ratio"] >= 0.95 and s["worst_epochs_ratio"] <= 0.5]
    # the settings no other beats on both worst-seed ratios
    frontier = [s for s in settings if not any(
        o["worst_hypervolume_ratio"] >= s["worst_hypervolume_ratio"] and o["worst_epochs_ratio"] <= s["worst_epochs_ratio"]
        and (o["worst_hypervolume_ratio"], o["worst_epochs_ratio"]) != (s["worst_hypervolume_ratio"], s["worst_epochs_ratio"])
        for o in settings)]
    frontier.sort(key=lambda s: s["worst_epochs_ratio"])
    for setting in settings:
        for key in ("worst_hypervolume_ratio", "worst_epochs_ratio"):
            setting[key] = round(setting[key], 4)
        for seed in setting["seeds"]:
            for key in ("hypervolume_ratio", "epochs_ratio"):
                seed[key] = round(seed[key], 4)
    bounds = []
    for row in report["rows"]:
        bound = hindsight(row["none"]["trials"], epochs=epochs, concurrency=concurrency)
        bounds.append({"seed": row["seed"], **bound, "epochs_ratio": round(bound["epochs"] / row["none"]["epochs"], 4)})
        print(f"seed {row['seed']}: with hindsight, {bound['epochs']} epochs keep 95% of the hypervolume "
              f"(trials run in full: {bound['full']})")
    head = {"replayed": path, "spec": body, "settings_replayed": len(settings), "hindsight": bounds,
            "meeting_both_targets_every_seed": meeting, "frontier": frontier}
    # one setting a line: the file stays readable and small
    lines = ",\n".join("  " + json.dumps(s) for s in settings)
    Path(out).write_text(json.dumps(head, indent=1)[:-2] + ',\n "settings": [\n' + lines + "\n ]\n}\n")
    print(f"{len(settings)} settings replayed over {path}; {len(meeting)} keep >= 95% of the hypervolume "
          f"for <= 50% of the epochs on every seed")
    print("| rule | min_epochs | reduction_factor | min_trials | cost_factor | variant | worst hypervolume ratio "
          "| worst epochs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for s in frontier:
        print(f"| {s['name']} | {s['min_epochs']} | {s.get('reduction_factor', '-')} | {s['min_trials']} | "
              f"{s['cost_factor']:g} | {s['variant']} | {s['worst_hypervolume_ratio']:.3f} | "
              f"{s['worst_epochs_ratio']:.3f} |")
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pruner", default="asha", choices=["none", "median", "asha", "successive-halving", "hyperband"],
                        help="none: run only the launches without a pruner (a baseline for --baseline and --replay)")
    parser.add_argument("--min-epochs", type=int, default=1, help="the pruner's min_epochs")
    parser.add_argument("--min-trials", type=int, default=2, help="the pruner's min_trials")
    parser.add_argument("--reduction-factor", type=int, default=3, help="the pruner's reduction_factor")
    parser.add_argument("--cost-factor", type=float, default=1.5, help="the pruner's cost_factor")
    parser.add_argument("--baseline", help="a result file of this benchmark (same spec) whose runs without a "
                                           "pruner are reused instead of run again")
    parser.add_argument("--replay", metavar="RESULT", help="replay a grid of pruner settings over the runs without "
                                                           "a pruner of this result file (no training)")
    parser.add_argument("--quick", action="store_true", help="digits-mlp, 2 seeds, 6 trials of 4 epochs")
    parser.add_argument("--out", default="bench/results/pruning.json")
    args = parser.parse_args(argv)
    if args.replay:
        return replay_grid(args.replay, args.out)
    if args.quick:
        args.seeds, args.trials, args.epochs = args.seeds[:2], 6, 4
    pruner = {"name": args.pruner, "min_epochs": args.min_epochs, "min_trials": args.min_trials,
              "cost_factor": args.cost_factor}
    if args.pruner != "median":
        pruner["reduction_factor"] = args.reduction_factor
    if args.pruner == "none":
        pruner = {"name": "none"}
    report_spec = spec("pruning-SEED", 0, pruner, quick=args.quick, trials=args.trials, epochs=args.epochs,
                       concurrency=args.concurrency)
    baseline = load_baseline(args.baseline, report_spec, args.seeds) if args.baseline else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsmsearch-pruning-") as tmp:
        for index, seed in enumerate(args.seeds):
            if args.pruner == "none":
                variants = [("none", {"name": "none"})]
            elif baseline:
                variants = [("pruned", pruner)]
            else:
                variants = [("none", {"name": "none"}), ("pruned", pruner)]
            if index % 2:  # alternate which goes first, so the machine's drift favours neither
                variants.reverse()
            row = {"seed": seed}
            if baseline:
                row["none"] = baseline[seed]
            for label, body_pruner in variants:
                name = f"pruning-{'none' if label == 'none' else args.pruner}-{seed}"
                body = spec(name, seed, body_pruner, quick=args.quick, trials=args.trials, epochs=args.epochs,
                            concurrency=args.concurrency)
                row[label] = run_one(Path(tmp), name, body)
                summary = {k: v for k, v in row[label].items() if k != "trials"}
                print(f"seed {seed} pruner {label}: {json.dumps(summary)}", flush=True)
            if "pruned" in row:
                row["hypervolume_ratio"] = row["pruned"]["hypervolume"] / row["none"]["hypervolume"]
                row["epochs_ratio"] = row["pruned"]["epochs"] / row["none"]["epochs"]
            rows.append(row)
            write_report(args, report_spec, rows)  # after every seed: a cut-short run keeps its seeds
    report = write_report(args, report_spec, rows)
    if args.pruner == "none":
        return 0
    print(f"| seed | hypervolume none / {args.pruner} | ratio | epochs none / {args.pruner} | ratio | pruned | "
          f"wall s none / {args.pruner} |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['seed']} | {r['none']['hypervolume']:.4f} / {r['pruned']['hypervolume']:.4f} | "
              f"{r['hypervolume_ratio']:.3f} | {r['none']['epochs']} / {r['pruned']['epochs']} | "
              f"{r['epochs_ratio']:.3f} | {r['pruned']['pruned']} of {args.trials} | "
              f"{r['none']['wall_s']:.0f} / {r['pruned']['wall_s']:.0f} |")
    return 0


def write_report(args, report_spec: dict, rows: list) -> dict:
    """Write the result file of the seeds run so far (without a pruner only: no ratios)."""
    report = {
        "spec": report_spec,
        # where the runs without a pruner come from: this run, or the result file named
        "baseline": args.baseline or "this run",
        "rows": rows,
    }
    if args.pruner != "none":
        report["median_hypervolume_ratio"] = statistics.median(r["hypervolume_ratio"] for r in rows)
        report["median_epochs_ratio"] = statistics.median(r["epochs_ratio"] for r in rows)
        report["targets_met_every_seed"] = all(r["hypervolume_ratio"] >= 0.95 and r["epochs_ratio"] <= 0.5
                                               for r in rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({len(rows)} seed(s))")
    return report


if __name__ == "__main__":
    sys.exit(main())
