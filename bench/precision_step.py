"""One training step of a transformer MLP block at fp32, bf16 (and fp16 on CUDA), side by side:
time per step and peak memory, through the trainer's own step (``TrainingLoop.autocast`` for the
forward and loss, ``_backward_step`` for backward and AdamW, then the GBLR budget step).

    python -m bench.precision_step              # CUDA: 768 -> 3072 -> 768, 8192 tokens
    python -m bench.precision_step --smoke      # tiny sizes on whatever device there is (CPU: fp32 vs bf16)

Without CUDA and without ``--smoke`` it prints a message and exits 0 (skipped).  ``bench/gpu.sh``
runs it after ``bench.gpu``; the report goes beside ``--out`` as ``<out>-precision.json``.
Per family (dense ``nn.Linear``, GBLR at the method's K with a FLOPs projection, low-rank at
budget 0.25) and precision: median ms per step, peak memory over the step (CUDA), and the loss
after the timed steps relative to fp32's (the same init, input and number of steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _model(family: str, dim: int, hidden: int, sigma: float) -> nn.Module:
    from gsmsearch.structured import replace_linears

    model = MLPBlock(dim, hidden)
    if family == "gblr":
        replace_linears(model, "gblr", include=["fc1", "fc2"], from_dense=False, sigma=sigma)
    elif family != "dense":
        replace_linears(model, family, include=["fc1", "fc2"], budget=0.25)
    return model


def _peak_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(device, *, dim, hidden, tokens, repeats, families=("dense", "gblr", "lowrank"), sigma=5.0):
    from gsmsearch.structured import ProjectFlops
    from gsmsearch.trainer import TrainingLoop

    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=device)
    results = {}
    for family in families:
        base = _model(family, dim, hidden, sigma)
        results[family] = {}
        for precision in precisions:
            model = copy.deepcopy(base)
            loop = TrainingLoop(None, model, None, epochs=1, batch_size=tokens, lr=1e-4, structure_lr=5e-4,
                                controller=ProjectFlops(0.3) if family == "gblr" else None,
                                precision=precision, device=str(device))
            losses = []

            def step():
                with loop.autocast():
                    loss = model(x).float().pow(2).mean()
                loop._backward_step(loss)
                if loop.layers:
                    loop.controller.step(loop.layers, 0.0, 5e-4)
                losses.append(loss.detach())

            for _ in range(2):  # warm-up (kernels compiled, allocator settled)
                step()
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - started))
            results[family][precision] = {"ms": statistics.median(times), "peak_mib": _peak_mib(step, device),
                                          "loss": float(losses[-1]), "steps": len(losses) + 1}
        reference = results[family]["fp32"]
        for precision, entry in results[family].items():
            entry["ms_vs_fp32"] = entry["ms"] / reference["ms"]
            entry["loss_rel_diff_vs_fp32"] = abs(entry["loss"] - reference["loss"]) / abs(reference["loss"])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join("bench", "results", "gpu.json"),
                        help="the report goes to this path with -precision before .json")
    args, rest = parser.parse_known_args(argv)
    if "--prepare" in rest:  # bench.gpu's CPU-side preparation: nothing to do here
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench.precision_step: no CUDA device found; skipped (use --smoke for a tiny CPU run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    sizes = dict(dim=64, hidden=256, tokens=256, repeats=min(args.repeats, 3)) if args.smoke else \
        dict(dim=768, hidden=3072, tokens=8192, repeats=args.repeats)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "config": sizes, "command": " ".join(["python -m bench.precision_step"] + sys.argv[1:]),
              "results": measure(device, **sizes)}
    print(f"training step by precision on {report['device']} ({sizes}): ms, ratio to fp32, peak MiB, "
          f"loss difference to fp32")
    for family, entries in report["results"].items():
        print(f"  {family:8s} " + "; ".join(
            f"{p} {e['ms']:.2f} ms ({e['ms_vs_fp32']:.2f}x), "
            f"{'-' if e['peak_mib'] is None else format(e['peak_mib'], '.0f')} MiB, {e['loss_rel_diff_vs_fp32']:.1e}"
            for p, e in entries.items()))
    base = args.out[:-len(".json")] if args.out.endswith(".json") else args.out
    out = base + ("-smoke" if args.smoke else "") + "-precision.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
