"""Benchmark GBLR fitting methods: relative Frobenius error and wall time.

    python bench/fit_gblr.py --threads 1 --out bench/results/fit-gblr.json   # full table + JSON
    python bench/fit_gblr.py --quick                                           # small cases only

Cases: planted 96x96 (five rank-2 blocks, budget 1.2x planted cost), planted 128x192 (six
overlapping rank-3 blocks, 1.2x), random Gaussian 768x3072 (budgets 0.1, 0.5) and 3072x768,
planted 768x3072 (twelve rank-4 blocks, 1.2x), a MiniLM-like
decaying spectrum 384x1536 (budget 0.25).  Methods: greedy, reference (steps shown), lowrank
(truncated SVD with rank floor(budget m n / (m + n))).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "structured"))

from gsmsearch.structured._gblr_fit import fit_gblr, lowrank_fit  # noqa: E402
from test_gblr_fit import decaying, planted  # noqa: E402

from bench._timing import allocator_peak, machine_info  # noqa: E402


def cases(quick: bool):
    W, cost, _ = planted(96, 96, 5, 2, 0, max_size=40)
    yield "planted 96x96", W, [1.2 * cost / W.numel()], 1000
    W, cost, _ = planted(128, 192, 6, 3, 0, max_size=64, overlap=True)
    yield "planted 128x192", W, [1.2 * cost / W.numel()], 1000
    if quick:
        return
    W = torch.randn(768, 3072, generator=torch.Generator().manual_seed(0))
    yield "random 768x3072", W, [0.1, 0.5], 30
    yield "random 3072x768", W.T.contiguous(), [0.1], 0
    W, cost, _ = planted(768, 3072, 12, 4, 0, max_size=400)
    yield "planted 768x3072", W.float(), [1.2 * cost / W.numel()], 0
    W = decaying(384, 1536, 0, power=0.5).float()
    yield "decaying 384x1536", W, [0.25], 100


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows and the machine to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"command": " ".join(["python bench/fit_gblr.py"] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine_info(), "rows": []}
    print(f"{'case':<20} {'method':<16} {'budget':>7} {'flops/B':>8} {'rel.err':>8} {'seconds':>8} {'peak MiB':>9}")
    for name, W, budgets, ref_steps in cases(args.quick):
        for budget in budgets:
            runs = [("greedy", lambda: fit_gblr(W, budget))]
            if ref_steps:
                runs.append((f"reference({ref_steps})",
                             lambda: fit_gblr(W, budget, method="reference", steps=ref_steps)))
            runs.append(("lowrank", lambda: lowrank_fit(W, budget)))
            for method, fn in runs:
                t = time.perf_counter()
                f = fn()  # timed without the profiler
                dt = time.perf_counter() - t
                _, peak = allocator_peak(fn)  # a second, profiled call for its memory
                err = float((f.to_dense().double() - W.double()).norm() / W.double().norm())
                ratio = f.flops() / (budget * W.numel())
                peak_s = "-" if peak is None else f"{peak:.1f}"
                print(f"{name:<20} {method:<16} {budget:>7.4f} {ratio:>8.3f} {err:>8.4f} {dt:>8.2f} {peak_s:>9}",
                      flush=True)
                report["rows"].append({"case": name, "shape": list(W.shape), "method": method, "budget": budget,
                                       "flops_over_budget": ratio, "relative_error": err, "seconds": dt,
                                       "allocator_peak_mib": peak})
    report["machine"]["load_average_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
