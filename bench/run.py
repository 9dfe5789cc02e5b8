"""CPU benchmarks of the layers: one command, a table of ratios on stdout, JSON in bench/results/.

    python -m bench                      # everything, all cores (a few minutes)
    python -m bench --threads 1          # one core: steadier on a shared machine
    python -m bench --quick              # smaller sizes, 3 repeats: a smoke run (under a minute)

Measured: (1) one GBLR layer's training step (forward + backward, masks recomputed each step)
against nn.Linear and against the reference implementation's way (irfft masks, dense masked
matrix rebuilt every step); (2) exported GBLR execution plans against dense at relative FLOPs
0.1 / 0.2 / 0.3 on structures learned by the method; (3) hand-crafted baselines at about 0.25.
All times are medians of interleaved repetitions in one process; memory is the peak RSS growth of
a fresh process during two calls (``bench/_timing.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import export_speed, train_step
from ._timing import machine_info, peak_rss_delta


def _train_memory(config: dict, threads: int) -> dict:
    import tempfile

    from torch import nn

    from gsmsearch.structured import GBLRLinear

    from .train_step import UnfusedGBLR

    n, m, K, T = config["in_features"], config["out_features"], config["num_components"], config["tokens"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        recompute = GBLRLinear(n, m, num_components=K, sigma=config["sigma"], recompute_intermediate=True)
        for name, module in (("nn.Linear", nn.Linear(n, m)),
                             ("gblr", GBLRLinear(n, m, num_components=K, sigma=config["sigma"])),
                             ("gblr recompute intermediate", recompute),
                             ("gblr unfused", UnfusedGBLR(n, m, num_components=K, sigma=config["sigma"]))):
            path = os.path.join(tmp, "m.pt")
            torch.save(module, path)
            out[name] = peak_rss_delta(path, (T, n), train=True, threads=threads)
    return out


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_tables(report: dict) -> None:
    info = report["machine"]
    print(f"# {info['cpu']} | {info['logical_cpus']} logical CPUs | torch {info['torch']} | "
          f"threads {report['threads']} | fp32 | load at start {info['load_average_at_start']}")
    print(f"# command: {report['command']}")
    for train in report.get("train", []):
        c = train["config"]
        print(f"\n## Training step: {c['in_features']} -> {c['out_features']}, K = {c['num_components']}, "
              f"{c['tokens']} tokens, input requires grad = {c['input_requires_grad']}, median of {c['repeats']}")
        print(f"{'candidate':42s} {'wall ms':>9s} {'cpu ms':>9s} {'x Linear (wall)':>16s} {'x Linear (cpu)':>15s}")
        for name, r in train["results"].items():
            print(f"{name:42s} {r['wall_ms']:9.1f} {r['cpu_ms']:9.1f} {r['wall_ratio']:16.2f} {r['cpu_ratio']:15.2f}")
        shares = ", ".join(f"{k}: {v:.1%}" for k, v in train["mask_share"].items())
        print(f"mask share of the GBLR step: {shares}; GEMM FLOP floor of the factored step "
              f"{train['factored_gemm_flop_ratio']:.2f}x; path chosen: {train['path_chosen']}")
        if "tensor_memory_mib" in train:
            print("tensor memory (MiB; kept for backward / allocator peak of the step): " + ", ".join(
                f"{k} {v['saved_for_backward_mib']:.1f} / {_fmt(v['allocator_peak_mib'], '.1f')}"
                for k, v in train["tensor_memory_mib"].items()))
        if "peak_rss_delta_mib" in train:
            print("peak RSS growth (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in train["peak_rss_delta_mib"].items()))
    if report.get("export"):
        print("\n## Inference after export (forward, no grad), speedup over dense F.linear, median wall time")
        print(f"{'structure':22s} {'shape':>10s} {'f':>6s} {'auto':>6s} {'(chose)':>9s} {'exec f':>7s} "
              f"{'of 1/f':>7s} {'grouped':>8s} {'factored':>9s} {'tiled':>6s} {'exact':>6s} {'layer':>6s} "
              f"{'max err':>8s} {'MiB d/a/e':>12s}")
        for r in report["export"]:
            mem = r.get("peak_rss_delta_mib")
            mem_s = "/".join(f"{mem[k]:.0f}" for k in ("dense", "auto", "exact")) if mem else "-"
            print(f"{r['structure']:22s} {r['shape'][0]:>4d}x{r['shape'][1]:<5d} {r['relative_flops']:6.3f} "
                  f"{r['speedup_auto']:6.2f} {r['auto_chose']:>9s} {r['executed_relative_flops']['auto']:7.3f} "
                  f"{r['fraction_of_ideal_auto']:7.2f} {r['speedup_grouped']:8.2f} {r['speedup_factored']:9.2f} "
                  f"{r['speedup_tiled']:6.2f} {r['speedup_exact']:6.2f} {r['speedup_gblr layer']:6.2f} "
                  f"{max(r['relative_error_vs_layer'].values()):8.1e} {mem_s:>12s}")
    if report.get("baselines"):
        print("\n## Hand-crafted baselines (forward, no grad), speedup over dense, median wall time")
        print(f"{'family':14s} {'config':44s} {'f':>6s} {'speedup':>8s} {'of 1/f':>7s} {'MiB dense/it':>13s}")
        for r in report["baselines"]:
            if "error" in r:
                print(f"{r['family']:14s} unavailable: {r['error'][:80]}")
                continue
            mem = r.get("peak_rss_delta_mib")
            mem_s = "/".join(f"{v:.0f}" for v in mem.values()) if mem else "-"
            print(f"{r['family']:14s} {json.dumps(r['config']):44s} {r['relative_flops']:6.3f} "
                  f"{r['speedup']:8.2f} {r['fraction_of_ideal']:7.2f} {mem_s:>13s}")
            if "speedup_one_pass" in r:
                print(f"{'':14s} the same layer in one pass over all tokens: "
                      f"{r['speedup_one_pass']:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions per candidate")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, no memory runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "export", "baselines"])
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--cache-dir", default=os.path.join("bench", "results", ".cache"),
                        help="where learned structures are cached")
    parser.add_argument("--out", default=os.path.join("bench", "results", "cpu.json"))
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    repeats = 3 if args.quick else args.repeats
    memory = not (args.no_memory or args.quick)
    report = {"machine": machine_info(), "threads": threads, "command": " ".join(["python -m bench"] + sys.argv[1:]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": "float32"}
    if "train" not in args.skip:
        sizes = dict(in_features=96, out_features=384, num_components=96, tokens=256) if args.quick else {}
        report["train"] = []
        for input_grad in (True, False):
            result = train_step.run(repeats=repeats, input_grad=input_grad, **sizes)
            if memory and input_grad:
                result["peak_rss_delta_mib"] = _train_memory(result["config"], threads)
            report["train"].append(result)
    if "export" not in args.skip:
        if args.quick:
            report["export"] = [export_speed.bench_structure(
                "lowrank@0.3", __import__("bench.structures", fromlist=["lowrank"]).lowrank(0.3, size=256),
                512, repeats, threads, False)]
        else:
            report["export"] = export_speed.run_structures(repeats=repeats, threads=threads, memory=memory,
                                                           cache_dir=args.cache_dir)
    if "baselines" not in args.skip:
        size, tokens = (256, 512) if args.quick else (1024, 4096)
        report["baselines"] = export_speed.run_baselines(size=size, tokens=tokens, repeats=repeats,
                                                         threads=threads, memory=memory)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print_tables(report)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
