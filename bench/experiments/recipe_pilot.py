"""Small fine-tune recipe pilots (lr schedule of the dense pre-training and of the fine-tune, lr),
outside bench/workloads.py because the pre-training schedule is a workload class default, not a
trial knob.  One JSON line per trial: recipe, seed, test/val accuracy, per-epoch val curve.

    .venv/bin/python bench/experiments/recipe_pilot.py animal-mnist-mixer \\
        '[["constant", "cosine", "gblr", 0.3, 0, {}], ...]' > bench/results/recipe-pilot-....jsonl

Each job: [pre-training schedule, fine-tune schedule, family, budget, seed, extra config]; an
extra key "pretrain_epochs" sets the dense pre-training's epochs (default: the workload's).
Structured trials use budget_allocation=global, distill=0.5 (the setting of RESULTS.md "Budget shared by the dense spectra, and distillation"); 10 epochs; 2
worker processes x 1 torch thread; dense caches in --cache-dir (default /tmp/recipe-pilot-cache).
"""
import json
import sys
from multiprocessing import Pool

CACHE = "/tmp/recipe-pilot-cache"


def job(args):
    workload, pre, ft, family, budget, seed, extra = args
    import torch

    torch.set_num_threads(1)
    from gsmsearch.trainer import TrialConfig, run_trial
    from gsmsearch.workloads._registry import _WORKLOADS

    extra = dict(extra)
    cls = _WORKLOADS[workload]
    cls.default_lr_schedule = pre  # the dense pre-training's schedule
    cls.default_epochs = int(extra.pop("pretrain_epochs", cls.default_epochs))
    config = dict(workload=workload, family=family, budget=budget, mode="finetune", epochs=10,
                  seed=seed, lr_schedule=ft, measure_latency=False)
    if family != "dense":
        config.update(budget_allocation="global", distill=0.5)
    config.update(extra)
    result = run_trial(TrialConfig(**config), cache_dir=CACHE)
    return dict(pre=pre, pretrain_epochs=cls.default_epochs, ft=ft, family=family, budget=budget, seed=seed, extra=extra,
                test=result.test_quality, val=result.val_quality, secs=result.train_seconds,
                curve=[round(e["val"].get("accuracy", 0) * 100, 1) for e in result.curves])


if __name__ == "__main__":
    workload, jobs = sys.argv[1], json.loads(sys.argv[2])
    with Pool(2) as pool:
        for out in pool.imap_unordered(job, [(workload, *j) for j in jobs]):
            print(json.dumps(out), flush=True)
