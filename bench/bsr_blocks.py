"""How much of the dense work the "bsr" export plan executes at each block shape, on the learned
structures of the CPU export benchmark (1024 x 1024 and MiniLM 1536 x 384), next to the tiled
and factored plans.  Counts, not times (the plan runs as a Triton kernel on a GPU, see
``bench/gpu.sh``); block shapes are (along the features, along t's columns).

    .venv/bin/python -m bench.bsr_blocks [--cache-dir bench/results/.cache]
"""
from __future__ import annotations

import argparse
import sys

from bench import structures
from gsmsearch.structured._export import BSR_BLOCKS, ExportedGBLR

SHAPES = ((32, 32),) + tuple(BSR_BLOCKS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bsr_blocks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="bench/results/.cache")
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
