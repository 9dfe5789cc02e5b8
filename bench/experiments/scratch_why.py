"""Why GBLR trails block-diagonal from scratch on the Mixer (bench/RESULTS.md "Accuracy: from scratch"): the structure
GBLR learns, or the way GBLR parametrises and trains a structure?

Three trainings per seed, all 20 epochs from a random init at budget 0.3, in the trainer's loop
(scratch mode, same data order, lr, weight decay):

- ``gblr``: the method's recipe (the grid's GBLR cell), with its final structure saved;
- ``gblr-own-structure-retrained``: that final structure (intervals and ranks) held fixed from the
  first step, contents from a fresh random init: is the learned structure itself the limit?
- ``gblr-as-blockdiag``: GBLR components placed exactly on block-diagonal's blocks (one
  component of rank min(h, c) per block, which the cost rule charges h c, so FLOPs equal
  block-diagonal's), structure fixed, contents the projection of the same random dense init:
  the block-diagonal function class in GBLR's factored parametrisation.

Block-diagonal itself (``blockdiag``) runs beside them.  One JSON line per training:

    .venv/bin/python bench/experiments/scratch_why.py --seeds 0 1 2 > bench/results/scratch-why.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

WORKLOAD, BUDGET, EPOCHS = "animal-mnist-mixer", 0.3, 20


def _fixed_structure_config(seed: int):
    from gsmsearch.trainer import TrialConfig

    # a GBLR trial whose structure never moves: exact masks, no width lr, no budget control
    return TrialConfig(workload=WORKLOAD, family="gblr", budget=BUDGET, mode="scratch", epochs=EPOCHS,
                       seed=seed, sigma_init=None, structure_lr=0.0, budget_anneal_epochs=0.0,
                       budget_control="none", measure_latency=False)


def _gblr_on_blocks(block) -> "object":
    """A GBLRLinear with one full-rank component per block of ``block`` (a BlockDiagonalLinear),
    computing the same matrix."""
    import torch

    from gsmsearch.structured import GBLRLinear

    dense = block.to_dense().detach()
    m, n = dense.shape
    b = block.num_blocks
    assert m % b == 0 and n % b == 0, "even blocks only"
    h, c = m // b, n // b
    r = min(h, c)
    layer = GBLRLinear(n, m, rank_per_component=r, num_components=b, bias=block.bias is not None)
    with torch.no_grad():
        for k in range(b):
            U, S, Vh = torch.linalg.svd(dense[k * h:(k + 1) * h, k * c:(k + 1) * c], full_matrices=False)
            root = S.sqrt()
            layer.row_factors[k].zero_()
            layer.col_factors[k].zero_()
            layer.row_factors[k, :, k * h:(k + 1) * h] = (U * root).T
            layer.col_factors[k, :, k * c:(k + 1) * c] = root[:, None] * Vh
        layer.widths.copy_(torch.tensor([[h / m] * b, [c / n] * b]))
        layer.locations.copy_(torch.tensor([[k / b for k in range(b)]] * 2))
        if block.bias is not None:
            layer.bias.copy_(block.bias)
    assert torch.allclose(layer.to_dense(), dense, atol=1e-5), "GBLR-on-blocks must equal the blocks"
    assert layer.flops() == block.flops(), (layer.flops(), block.flops())
    return layer


def job(args):
    kind, seed, workdir = args
    import torch

    torch.set_num_threads(1)
    from gsmsearch.structured import BlockDiagonalLinear, GBLRLinear, load_structure, set_module
    from gsmsearch.trainer import TrialConfig, run_trial
    from gsmsearch.trainer import _trial

    structure = Path(workdir) / f"gblr-s{seed}.safetensors"
    if kind in ("gblr", "blockdiag"):
        config = TrialConfig(workload=WORKLOAD, family=kind, budget=BUDGET, mode="scratch",
                             epochs=EPOCHS, seed=seed, measure_latency=False)
        result = run_trial(config, structure_path=structure if kind == "gblr" else None)
    else:
        original = _trial._build_trial_model

        def build(config, workload, *, cache_dir=None):
            if kind == "gblr-as-blockdiag":
                model, _ = original(TrialConfig(**{**config.to_dict(), "family": "blockdiag"}),
                                    workload, cache_dir=cache_dir)
                for name, module in list(model.named_modules()):
                    if isinstance(module, BlockDiagonalLinear):
                        set_module(model, name, _gblr_on_blocks(module))
                return model, None
            # own structure, fresh contents: the scratch init (SVD of a random dense init), then
            # the saved trial's intervals
            model, _ = original(config, workload, cache_dir=cache_dir)
            saved = load_structure(workload.build_model(), structure)
            for name, module in list(model.named_modules()):
                if isinstance(module, GBLRLinear):
                    learned = saved.get_submodule(name)
                    fresh = GBLRLinear(module.in_features, module.out_features,
                                       rank_per_component=learned.rank,
                                       num_components=learned.num_components)
                    with torch.no_grad():
                        fresh.widths.copy_(learned.widths)
                        fresh.locations.copy_(learned.locations)
                    set_module(model, name, fresh)
            return model, None

        _trial._build_trial_model = build
        try:
            result = run_trial(_fixed_structure_config(seed))
        finally:
            _trial._build_trial_model = original
    return {"kind": kind, "seed": seed, "test": result.test_quality, "val": result.val_quality,
            "structured_relative_flops": result.structured_relative_flops,
            "live_components": {n: l.get("live_components") for n, l in result.layers.items()},
            "curve": [round(e["val"]["accuracy"] * 100, 1) for e in result.curves]}


def main(argv=None) -> int:
    global EPOCHS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="(a smoke run: fewer)")
    args = parser.parse_args(argv)
    EPOCHS = args.epochs  # the pool's processes are forked after this
    with tempfile.TemporaryDirectory() as workdir, Pool(args.jobs, maxtasksperchild=1) as pool:
        first = [(kind, seed, workdir) for seed in args.seeds for kind in ("gblr", "blockdiag", "gblr-as-blockdiag")]
        for out in pool.imap_unordered(job, first):
            print(json.dumps(out), flush=True)
        for out in pool.imap_unordered(job, [("gblr-own-structure-retrained", s, workdir) for s in args.seeds]):
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
