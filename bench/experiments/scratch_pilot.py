"""Scratch-mode recipe pilot on animal-mnist-mixer at budget 0.3, 20 epochs (bench/RESULTS.md "What did not help").
One JSON line per trial: label, seed, test/val accuracy, per-epoch (val %, relative FLOPs, mean
width, sigma) and live components per layer.

    .venv/bin/python bench/experiments/scratch_pilot.py '[["slr5e-4", {"structure_lr": 0.0005}, 0], ...]' \\
        >> bench/results/scratch-pilot.jsonl

Each job: [label, TrialConfig overrides ("workload", default animal-mnist-mixer, and "family",
default gblr, included), seed];
2 worker processes x 1 torch thread.
"""
import json
import sys
from multiprocessing import Pool


def job(args):
    label, extra, seed = args
    extra = dict(extra)
    import torch

    torch.set_num_threads(1)
    from gsmsearch.trainer import TrialConfig, run_trial

    config = dict(workload=extra.pop("workload", "animal-mnist-mixer"), family=extra.pop("family", "gblr"),
                  budget=0.3, mode="scratch", epochs=20, seed=seed, measure_latency=False)
    config.update(extra)
    result = run_trial(TrialConfig(**config), cache_dir="/tmp/scratch-pilot-cache")
    curve = [(round(e["val"]["accuracy"] * 100, 1), round(e["relative_flops"], 2),
              None if e["mean_width"] is None else round(e["mean_width"], 2),
              None if e["sigma"] is None else round(e["sigma"], 1)) for e in result.curves]
    live = {name: layer.get("live_components") for name, layer in result.layers.items()}
    return dict(label=label, workload=config["workload"], seed=seed, test=round(result.test_quality * 100, 2),
                val=round(result.val_quality * 100, 2), curve=curve, live=live)


if __name__ == "__main__":
    with Pool(2) as pool:
        for out in pool.imap_unordered(job, [tuple(j) for j in json.loads(sys.argv[1])]):
            print(json.dumps(out), flush=True)
