"""Search orchestration: per-trial overhead and throughput with 1 vs 2 concurrent trials.

    .venv/bin/python -m bench.orchestration            # prints a table, writes bench/results/orchestration.json
    .venv/bin/python -m bench.orchestration --trials 16 --epochs 120   # a longer fixed workload

A fixed workload (digits-mlp, low-rank at budget 0.25, one trial per seed so every configuration
is distinct) runs as a real study: local Ray on 127.0.0.1, SQLite storage in a temporary folder,
the same driver as `gsmsearch launch`.  Ray is started once before the timed runs (its start-up,
5-9 s here, is reported separately).  Per trial the driver records: submission -> the trial
starting in its worker (includes creating a worker actor the first time: importing torch),
the trial itself, its result travelling back, and recording it in the database.  Launches at
concurrency 1 and 2 alternate (``--repeats`` pairs, the order swapped every pair) and the ratio
is of the median walls, so that the machine's drift during the run favours neither.
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

import yaml


def _spec(name: str, trials: int, concurrency: int, epochs: int) -> dict:
    return {
        "name": name,
        "workload": {"name": "digits-mlp", "epochs": epochs, "batch_size": 64, "lr": 0.003,
                     "seeds": list(range(trials))},
        "families": {"lowrank": {"budget": 0.25}},
        "sampler": {"name": "random", "seed": 0},
        "trials": trials,
        "concurrency": concurrency,
        "resources": {"cpus_per_trial": 1},
        "retries": 0,
    }


def _idle(timings, begin: float, end: float) -> dict:
    """Where the wall time goes that no trial uses: each worker's idle time between the end of
    one trial and the start of its next (the driver receiving, asking the sampler, writing the
    new trial, submitting; the per-trial overhead on the critical path), the launch's start-up
    until the first trial starts (database, study, creating the worker actors: importing torch),
    and its end after the last trial (recording, the final front).  Worker clocks and the
    driver's are the same host's here."""
    by_worker = {}
    for t in timings:
        by_worker.setdefault(t["worker"], []).append(t)
    gaps = []
    for runs in by_worker.values():
        runs.sort(key=lambda t: t["started"])
        gaps += [b["started"] - a["finished"] for a, b in zip(runs, runs[1:])]
    return {
        "workers": len(by_worker),
        "median_idle_gap_s": statistics.median(gaps) if gaps else float("nan"),
        "max_idle_gap_s": max(gaps) if gaps else float("nan"),
        "startup_s": min(t["started"] for t in timings) - begin,
        "teardown_s": end - max(t["finished"] for t in timings),
    }


def _launch_once(launch, path: Path, trials: int) -> dict:
    begin, begin_clock = time.perf_counter(), time.time()
    summary = launch(path, out=open(os.devnull, "w"), status_interval=1e9)
    wall = time.perf_counter() - begin
    end_clock = time.time()
    assert summary.completed == trials, summary
    timings = summary.timings
    overhead = [t["submit_to_start_s"] + t["return_s"] + t["record_s"] for t in timings]
    return {
        "wall_s": wall,
        "trials": trials,
        "throughput_trials_per_min": 60 * trials / wall,
        "median_run_s": statistics.median(t["run_s"] for t in timings),
        "median_overhead_s": statistics.median(overhead),
        "max_overhead_s": max(overhead),
        "median_submit_to_start_s": statistics.median(t["submit_to_start_s"] for t in timings),
        "median_record_s": statistics.median(t["record_s"] for t in timings),
        "median_return_s": statistics.median(t["return_s"] for t in timings),
        **_idle(timings, begin_clock, end_clock),
        "timings": timings,
    }


def run(trials: int, epochs: int, repeats: int) -> dict:
    """``repeats`` pairs of launches, one at each concurrency, alternating which goes first (1, 2
    then 2, 1, ...) so that a machine drifting faster or slower during the run biases neither."""
    from gsmsearch.search import launch
    from gsmsearch.search._runner import start_ray

    started = time.perf_counter()
    start_ray(None, num_cpus=os.cpu_count())
    ray_start = time.perf_counter() - started
    out = {"ray_start_s": ray_start, "repeats": repeats, "runs": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        # a warm-up study (dense model cache, data files in the page cache), not timed
        warm = Path(tmp) / "warm.yaml"
        warm.write_text(yaml.safe_dump(_spec("warm", 2, 2, 1)))
        launch(warm, out=open(os.devnull, "w"), status_interval=1e9)
        for repeat in range(repeats):
            for concurrency in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                path = Path(tmp) / f"c{concurrency}-r{repeat}.yaml"
                path.write_text(yaml.safe_dump(_spec(f"c{concurrency}-r{repeat}", trials, concurrency, epochs)))
                out["runs"][concurrency].append(_launch_once(launch, path, trials))
    ones, twos = out["runs"][1], out["runs"][2]
    out["pair_ratios"] = [a["wall_s"] / b["wall_s"] for a, b in zip(ones, twos)]
    out["speedup_2_vs_1"] = (statistics.median(r["wall_s"] for r in ones)
                             / statistics.median(r["wall_s"] for r in twos))
    # the same ratio without each launch's start-up (opening the study, creating the worker
    # actors: a process importing torch), which a study pays once whatever its length
    out["speedup_2_vs_1_after_startup"] = (statistics.median(r["wall_s"] - r["startup_s"] for r in ones)
                                           / statistics.median(r["wall_s"] - r["startup_s"] for r in twos))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of launches (c=1, c=2); medians are reported")
    parser.add_argument("--out", default="bench/results/orchestration.json")
    args = parser.parse_args(argv)
    from ._timing import machine_info

    report = {"machine": machine_info(), "command": " ".join([sys.executable, "-m", "bench.orchestration"] + (argv or sys.argv[1:])),
              **run(args.trials, args.epochs, args.repeats)}
    print(f"# {report['machine']['cpu']} | {report['machine']['logical_cpus']} CPUs | torch {report['machine']['torch']}")
    print(f"# {args.trials} trials of {args.epochs} epochs per launch; {args.repeats} launch(es) at each "
          f"concurrency, alternating; medians over them")
    print(f"# Ray start-up (once per launch): {report['ray_start_s']:.1f} s")

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    print(f"{'concurrency':>11s} {'wall s':>8s} {'trials/min':>10s} {'trial s':>8s} {'overhead s (med/max)':>21s} "
          f"{'idle gap s (med/max)':>21s} {'start-up s':>10s} {'teardown s':>10s}")
    for c, runs in report["runs"].items():
        print(f"{c:>11d} {med(runs, 'wall_s'):8.1f} {med(runs, 'throughput_trials_per_min'):10.1f} "
              f"{med(runs, 'median_run_s'):8.2f} {med(runs, 'median_overhead_s'):10.3f}/{max(r['max_overhead_s'] for r in runs):<10.3f} "
              f"{med(runs, 'median_idle_gap_s'):10.3f}/{max(r['max_idle_gap_s'] for r in runs):<10.3f} "
              f"{med(runs, 'startup_s'):10.2f} {med(runs, 'teardown_s'):10.2f}")
    print("per pair, c=2 / c=1: " + ", ".join(f"{x:.2f}x" for x in report["pair_ratios"]))
    print(f"throughput with 2 concurrent trials / 1 (median walls): {report['speedup_2_vs_1']:.2f}x "
          f"({report['speedup_2_vs_1_after_startup']:.2f}x after each launch's start-up)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
