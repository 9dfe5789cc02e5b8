"""How much of the dense work the "bsr" export plan executes at each block shape, on the learned
structures of the CPU export benchmark (1024 x 1024 and MiniLM 1536 x 384), next to the tiled
and factored plans.  Counts, not times (the plan runs as a Triton kernel on a GPU, see
``bench/gpu.sh``); block shapes are (along the features, along t's columns).

    .venv/bin/python -m bench.bsr_blocks --out bench/results/bsr-blocks.json [--cache-dir bench/results/.cache]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

from bench import structures
from gsmsearch.structured._export import BSR_BLOCKS, ExportedGBLR

SHAPES = ((32, 32),) + tuple(BSR_BLOCKS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bsr_blocks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="bench/results/.cache")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    report = {"command": " ".join(["python -m bench.bsr_blocks"] + (sys.argv[1:] if argv is None else argv)),
              "date": datetime.date.today().isoformat(), "rows": []}
    c = args.cache_dir
    kinds = {
        "proximal": lambda b: structures.proximal(b, cache_dir=c),
        "digits": lambda b: structures.digits_trained(b, cache_dir=c),
        "minilm-greedy": lambda b: structures.minilm(b, greedy_only=True, cache_dir=c),
        "minilm": lambda b: structures.minilm(b, cache_dir=c),
    }
    names = ["tiled", "factored"] + ["bsr%dx%d" % s for s in SHAPES]
    print("| structure | budget | f | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for kind, build in kinds.items():
        for budget in (0.1, 0.2, 0.3):
            layer = build(budget)
            dense = layer.in_features * layer.out_features
            row = [ExportedGBLR.from_gblr(layer, plan=p).executed_flops() / dense for p in ("tiled", "factored")]
            row += [ExportedGBLR.from_gblr(layer, plan="bsr", block=s).executed_flops() / dense for s in SHAPES]
            print(f"| {kind} | {budget} | {layer.flops() / dense:.3f} | " + " | ".join(f"{v:.3f}" for v in row) + " |",
                  flush=True)
            report["rows"].append({"structure": kind, "budget": budget, "method_flops": layer.flops() / dense,
                                   "executed_flops": dict(zip(names, row))})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
