"""Dense baselines of the built-in workloads: train with Adam (AdamW) on CPU, report quality.

Usage: .venv/bin/python bench/dense_workloads.py [WORKLOAD ...] [--epochs N] [--seed S]
Checks the digits-mlp target (dense test accuracy >= 0.97 with its defaults) and prints
``name  epochs  seconds  val  test`` for each workload.  A deliberately minimal loop: the real
trainer lives elsewhere.
"""
from __future__ import annotations

import argparse
import time

import torch

from gsmsearch.workloads import get_workload, workload_names

TARGETS = {"digits-mlp": 0.97}


def train_dense(name: str, epochs: int | None, seed: int) -> dict:
    workload = get_workload(name)
    torch.manual_seed(seed)
    splits = workload.load_data(seed=0)
    model = workload.build_model()
    epochs = epochs or workload.default_epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=workload.default_lr, weight_decay=workload.default_weight_decay
    )
    loader = splits.loader("train", workload.default_batch_size, shuffle=True, seed=seed)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, workload.default_lr, total_steps=steps)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in loader:
            loss = workload.loss(workload.forward(model, batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    evaluate = lambda split: workload.evaluate(model, splits[split], collate_fn=splits.collate_fn)
    return {"epochs": epochs, "seconds": seconds, "val": evaluate("val"), "test": evaluate("test")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["digits-mlp"], help=f"of {workload_names()}")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    failed = False
    for name in args.workloads:
        result = train_dense(name, args.epochs, args.seed)
        test_quality = result["test"]["quality"]
        print(
            f"{name:20s} epochs={result['epochs']:3d} {result['seconds']:7.1f}s "
            f"val={result['val']['quality']:.4f} test={test_quality:.4f} "
            f"test_metrics={ {k: round(v, 4) for k, v in result['test'].items()} }",
            flush=True,
        )
        if name in TARGETS and args.epochs is None and test_quality < TARGETS[name]:
            print(f"FAIL: {name} dense test quality {test_quality:.4f} < {TARGETS[name]}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
