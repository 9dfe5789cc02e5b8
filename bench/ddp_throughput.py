"""Training throughput of one trial on 1 worker vs N data-parallel workers, side by side.

    python -m bench.ddp_throughput                    # CPU: writes bench/results/ddp-cpu.json
    python -m bench.ddp_throughput --device cuda      # GPU: writes bench/results/ddp-gpu.json
    python -m bench.ddp_throughput --smoke            # 1 round, 1 epoch

Each candidate is a worker (or a group of workers, ``resources.workers_per_trial``) made by the
driver's own ``make_worker`` on a local Ray, and runs the same trial config (same global batch,
seed and data order) through the worker's ``run``, as a study does.  Workers are made once, run
one untimed 1-epoch trial, and are reused, so process start, imports and first-call costs are not
timed.  On CPU every candidate's worker exists at once (the local Ray counts 1 + 2N logical CPUs;
one trial runs at a time, so the physical cores are not shared) and each round runs every
candidate once (interleaved, so a shared machine's drift hits all alike); on CUDA the candidates
run one after the other (each holds the GPU).  The report gives the median over rounds of the trial's ``samples_per_second`` (training samples of all ranks over rank 0's
training-step time, validation excluded), the ratio to the one-worker baseline, and the trained
model's validation quality per candidate (they train the same steps: qualities agree to float32
summation order), and the peak memory the trial records: on CPU the process peak resident set
size of rank 0's worker (the rank that also validates and writes the checkpoints), the largest
over rounds; on CUDA the most memory torch allocated on rank 0's device.

CPU candidates: 1 worker x 1 CPU (the baseline), 1 worker x N CPUs (torch threads) and N workers
x 1 CPU (gloo).  CUDA candidates: 1 worker x 1 GPU, N workers sharing that GPU (gloo; fractional
GPUs, no NCCL: NCCL refuses two ranks on one device) and, where the machine has N GPUs, N workers
x 1 GPU (nccl).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _candidates(device: str, n: int, gpus: int):
    """(label, make_worker arguments) of every candidate."""
    if device == "cpu":
        return [("1 worker x 1 CPU", dict(cpus=1, gpus=0)),
                (f"1 worker x {n} CPUs", dict(cpus=n, gpus=0)),
                (f"{n} workers x 1 CPU (gloo)", dict(cpus=n, gpus=0, workers=n))]
    found = [("1 worker x 1 GPU", dict(cpus=1, gpus=1)),
             (f"{n} workers sharing 1 GPU (gloo)", dict(cpus=n, gpus=1, workers=n))]
    if gpus >= n:
        found.append((f"{n} workers x 1 GPU (nccl)", dict(cpus=n, gpus=n, workers=n)))
    return found


def _mib(values):
    """The largest of the recorded peaks in MiB (None when no round recorded one)."""
    known = [v for v in values if v is not None]
    return round(max(known) / 2**20, 1) if known else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ddp_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="N, the data-parallel workers per trial")
    parser.add_argument("--workload", default="digits-mlp")
    parser.add_argument("--options", default='{"hidden_sizes": [1024, 1024]}', help="workload options, JSON")
    parser.add_argument("--family", default="gblr")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 epoch")
    parser.add_argument("--out", default=None, help="default bench/results/ddp-<device>.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.epochs = 1, 1

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.ddp_throughput: no CUDA device found; skipped")
        return 0
    import ray

    from bench._timing import machine_info
    from gsmsearch.search._runner import kill_worker, make_worker, start_ray
    from gsmsearch.trainer import TrialConfig

    n = int(args.workers)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    config = TrialConfig(workload=args.workload, workload_options=json.loads(args.options), family=args.family,
                         budget=0.3, epochs=args.epochs, batch_size=args.batch_size, seed=0, device=args.device,
                         measure_latency=False, precision="fp32").to_dict()
    machine = machine_info()
    # logical CPUs: every CPU candidate's workers exist at once (one trial runs at a time); Ray
    # finds the GPUs itself
    where = start_ray(None, num_cpus=1 + 2 * n)
    candidates = _candidates(args.device, n, gpus)
    rates = {label: [] for label, _ in candidates}
    quality = {}
    memory = {label: [] for label, _ in candidates}
    workdir = tempfile.mkdtemp(prefix="ddp-bench-")
    started = time.time()
    warmup = {**config, "epochs": 1}

    def trial(label, options, cfg, folder):
        outcome = ray.get(options["handle"].run.remote(cfg, os.path.join(workdir, folder),
                                                       os.path.join(workdir, "cache"), None, token=folder),
                          timeout=3600)
        if not outcome.get("ok"):
            raise SystemExit(f"{label}: the trial failed: {outcome.get('reason')}")
        return outcome["result"]

    def start(label, options):
        options["handle"] = make_worker(options["cpus"], options["gpus"],
                                        **({"workers": options["workers"]} if "workers" in options else {}))
        trial(label, options, warmup, f"warmup-{label}")

    def timed(round_, index, label, options):
        result = trial(label, options, config, f"r{round_}-c{index}")
        rates[label].append(result["samples_per_second"])
        quality[label] = result["quality"]
        memory[label].append(result.get("peak_memory_bytes"))
        print(f"round {round_ + 1}/{args.rounds} {label}: {result['samples_per_second']:.0f} samples/s "
              f"(world size {result['world_size']}, quality {result['quality']:.4f})", flush=True)

    try:
        if args.device == "cpu":
            for label, options in candidates:
                start(label, options)
            for round_ in range(args.rounds):
                for index, (label, options) in enumerate(candidates):
                    timed(round_, index, label, options)
        else:
            for index, (label, options) in enumerate(candidates):
                start(label, options)
                for round_ in range(args.rounds):
                    timed(round_, index, label, options)
                kill_worker(options.pop("handle"))
    finally:
        for _, options in candidates:
            if "handle" in options:
                kill_worker(options["handle"])
        ray.shutdown()
    base = statistics.median(rates[candidates[0][0]])
    rows = [{"candidate": label, "samples_per_second": statistics.median(rates[label]),
             "ratio_to_1_worker": statistics.median(rates[label]) / base,
             "samples_per_second_all": [round(r, 1) for r in rates[label]], "val_quality": quality[label],
             "peak_memory_mib": _mib(memory[label]), "peak_memory_kind": "cuda_max_allocated" if gpus
             else "process_peak_rss of rank 0"}
            for label, _ in candidates]
    report = {
        "command": " ".join(["python -m bench.ddp_throughput"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": {**machine, "gpus": gpus, "gpu": torch.cuda.get_device_name() if gpus else None,
                    "load_average_at_end": os.getloadavg()},
        "ray": where,
        "config": {k: config[k] for k in ("workload", "workload_options", "family", "budget", "epochs", "batch_size")},
        "rounds": args.rounds,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    print(f"\n{args.workload} {args.family} trial, global batch {args.batch_size}, {args.epochs} epochs, "
          f"median of {args.rounds} rounds:")
    for row in rows:
        print(f"  {row['candidate']:32s} {row['samples_per_second']:9.0f} samples/s  "
              f"{row['ratio_to_1_worker']:.2f}x  quality {row['val_quality']:.4f}  "
              f"peak {row['peak_memory_mib']} MiB")
    out = args.out or os.path.join("bench", "results", f"ddp-{args.device}{'-smoke' if args.smoke else ''}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
