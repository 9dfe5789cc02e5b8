"""GPU benchmarks of the layers (CUDA, bf16): the training step at 8192 tokens and exported plans at
4096 x 4096, 8192 tokens.  Timing with CUDA events, median of interleaved repetitions.

    python -m bench.gpu              # on a CUDA machine; writes bench/results/gpu.json
    python -m bench.gpu --smoke      # tiny sizes on whatever device there is (CPU: float32)

Without CUDA and without ``--smoke`` it prints a message and exits 0 (skipped).
The training step runs the fused training Function with its Triton mask kernels
(``_mask_kernel``) beside the same Function on torch ops ("gblr torch-op masks"); the export compares the torch-op plans (grouped, factored, tiled) with the Triton
block-sparse plan ("bsr", two kernel launches) at each of its block sizes.  The train step also reports memory (kept for
backward, CUDA peak per step) and checks the fused Function's gradients against the unfused
composition on the device.
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


def _timer(device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return measure


def _interleaved(candidates, repeats, device):
    measure = _timer(device)
    for fn in candidates.values():
        fn()
    times = {k: [] for k in candidates}
    for _ in range(repeats):
        for k, fn in candidates.items():
            times[k].append(measure(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(device, dtype, *, n, m, K, tokens, sigma, repeats):
    from gsmsearch.structured import GBLRLinear
    from gsmsearch.structured._mask import gaudi_mask_reference

    x = torch.randn(tokens, n, device=device, requires_grad=True)
    linear = nn.Linear(n, m).to(device)
    layer = GBLRLinear(n, m, num_components=K, sigma=sigma).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    from bench.train_step import structure_moved

    def step(module):
        def run():
            if module is not frozen:
                structure_moved(module)  # learned while training: read every step
            with autocast:
                y = module(x)
            y.float().sum().backward()
        return run

    def reference():
        with autocast:
            rm = gaudi_mask_reference(layer.widths[0], layer.locations[0], m, sigma)
            cm = gaudi_mask_reference(layer.widths[1], layer.locations[1], n, sigma)
            W = (layer.row_factors * rm[:, None]).reshape(-1, m).T @ (layer.col_factors * cm[:, None]).reshape(-1, n)
            y = x @ W.T + layer.bias
        y.float().sum().backward()

    with torch.no_grad():
        rm, cm = layer.masks()

    def cached():
        with autocast:
            Um = (layer.row_factors * rm[:, None]).reshape(-1, m)
            Vm = (layer.col_factors * cm[:, None]).reshape(-1, n)
            y = nn.functional.linear(x @ Vm.T, Um.T, layer.bias)
        y.float().sum().backward()

    from bench._timing import tensor_memory
    from bench.train_step import UnfusedGBLR, _variant

    recompute = _variant(layer, recompute=True).to(device)
    unfused = _variant(layer, UnfusedGBLR).to(device)
    torch_ops = _variant(layer).to(device)
    torch_ops.use_kernels = False  # the same Function with torch ops for the masks
    sync_free = _variant(layer).to(device)
    sync_free.sync_free = True  # no host read of the widths per step: every component runs
    # later in training: half the components dead (both widths 0), which the default path
    # drops from its GEMMs after one host read and the sync-free path runs with zero masks
    half_dead = _variant(layer).to(device)
    with torch.no_grad():
        half_dead.widths[:, ::2] = 0.0
    half_dead_sync_free = _variant(half_dead).to(device)
    half_dead_sync_free.sync_free = True
    # fine-tuning a fit (structure_lr = 0): the structure is read once, then kept
    frozen = _variant(half_dead).to(device)
    frozen.widths.requires_grad_(False)
    frozen.locations.requires_grad_(False)
    import warnings

    from gsmsearch.structured import _gblr_autograd

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels_error = _first_call(step(layer))  # a Triton that rejects the kernels: torch ops, noted
    if kernels_error is None and _gblr_autograd._KERNELS_WORK.get(str(device)) is False:
        kernels_error = "; ".join(str(w.message) for w in caught if "Triton kernels failed" in str(w.message))
    if kernels_error:
        print(f"training kernels failed, timing the torch-op path in their place: {kernels_error}")
        for module in (layer, recompute, sync_free, half_dead, half_dead_sync_free, frozen):
            module.use_kernels = False
    modules = {"nn.Linear": linear, "gblr": layer, "gblr sync-free": sync_free,
               "gblr half dead": half_dead, "gblr half dead sync-free": half_dead_sync_free,
               "gblr half dead frozen structure": frozen,
               "gblr recompute intermediate": recompute, "gblr torch-op masks": torch_ops,
               "gblr unfused": unfused}
    times = _interleaved({**{name: step(module) for name, module in modules.items()},
                          "gblr cached masks": cached, "reference": reference}, repeats, device)
    memory = {}
    for name, module in modules.items():
        kept = tensor_memory(step(module), exclude=[x, *module.parameters()])["saved_for_backward_mib"]
        memory[name] = {"kept_for_backward_mib": kept, "step_peak_mib": _step_peak_mib(step(module), device)}
    syncs = {name: _host_syncs(step(module), device) for name, module in modules.items()}
    return {"config": dict(n=n, m=m, K=K, tokens=tokens, sigma=sigma, dtype=str(dtype)), "ms": times,
            "kernels_error": kernels_error, "host_syncs_per_step": syncs,
            "ratio_vs_linear": {k: v / times["nn.Linear"] for k, v in times.items()},
            "memory": memory, "fused_vs_unfused_grad_error": _grad_error(layer, unfused, x, step),
            "sync_free_vs_gblr_grad_error": max(_grad_error(sync_free, layer, x, step),
                                                _grad_error(half_dead_sync_free, half_dead, x, step)),
            "kernels_vs_torch_ops_grad_error_fp32": _grad_error(
                layer, torch_ops, x, lambda module: (lambda: module(x).sum().backward()))}


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _first_call(fn):
    """Run ``fn`` once; None if it worked, else the error as text (a GPU run should report what
    failed and go on with the rest, not lose every number to one kernel)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        import traceback

        frame = traceback.extract_tb(error.__traceback__)[-1]
        return f"{type(error).__name__}: {str(error)[:400]} (at {frame.filename}:{frame.lineno})"
    return None


def _graphed(fn, device):
    """``fn`` captured once into a CUDA graph; returns its replay (None off CUDA or when the
    capture fails, e.g. a host sync inside)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture (allocator, Triton compiles)
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as error:  # noqa: BLE001 - reported, the eager times stand
        print(f"CUDA graph capture failed: {type(error).__name__}: {error}")
        return None


def _host_syncs(fn, device):
    """CUDA: how many times one step makes the host wait for the GPU (torch's sync debug mode
    warns at each); None on CPU, where nothing waits."""
    if device.type != "cuda":
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _step_peak_mib(fn, device):
    """CUDA: peak allocated memory during one step over what was allocated before it (None on CPU:
    the CPU suite measures that, ``python -m bench``)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _grad_error(fused, unfused, x, step):
    """Largest relative error between the fused layer's gradients (input and every parameter)
    and the unfused composition's, same weights, same autocast: the GPU check of the fused
    Function (CI has no GPU)."""
    grads = []
    for module in (fused, unfused):
        module.zero_grad(set_to_none=True)
        x.grad = None
        step(module)()
        grads.append([x.grad.float().clone()] + [p.grad.float().clone() for p in module.parameters()])
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*grads))


PREPARED = os.path.join("bench", "results", "gpu-structures")  # carried to the GPU machine
PREPARED_KINDS = {  # real structures, prepared on a CPU machine (``--prepare``)
    "digits": "a layer of a real digits-mlp trial trained from scratch by the method (1024 x 1024)",
    "minilm": "from_dense of MiniLM-L6's encoder.layer.0.intermediate weight, default fit (1536 x 384)",
    "minilm-greedy": "the same fit without the low-rank fallback (interval structure)",
}


def prepare(directory: str = PREPARED, budgets=(0.1, 0.2, 0.3), cache_dir="bench/results/.cache") -> None:
    """Write the real structures of the CPU export benchmark (live components only) for the GPU
    run; the folder is git-ignored, so the device call names it in ``carry``."""
    from bench import structures

    os.makedirs(directory, exist_ok=True)
    for budget in budgets:
        for kind in PREPARED_KINDS:
            if kind == "digits":
                layer = structures.digits_trained(budget, cache_dir=cache_dir)
            else:
                layer = structures.minilm(budget, greedy_only=kind == "minilm-greedy", cache_dir=cache_dir)
            path = os.path.join(directory, f"{kind}-{budget:g}.pt")
            structures.save_layer(structures.live_only(layer), path, {"kind": kind, "budget": budget})
            print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def _prepared(directory: str = PREPARED):
    from bench import structures

    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.endswith(".pt"))
    return [(name[:-3], structures.load_layer(os.path.join(directory, name))) for name in names]


def export_speed(device, dtype, *, size, tokens, budgets, repeats, steps=150, prepared=()):
    """Every export plan vs dense F.linear on a low-rank control, on a structure learned by the
    method (``bench.structures.proximal``, learned on the device at ``size``), and on the
    ``prepared`` real structures (name, layer) at their own sizes."""
    from bench import structures
    from gsmsearch.structured._export import BSR_BLOCK, BSR_BLOCKS, ExportedGBLR, PlanCost

    rows = []
    cases = [("lowrank", b) for b in budgets] + [("proximal", b) for b in budgets] + list(prepared)
    for kind, budget in cases:
        if kind == "lowrank":
            layer = structures.lowrank(budget, size=size)
        elif kind == "proximal":
            layer = structures.proximal(budget, size=size, steps=steps, device=str(device))
        else:
            layer = budget  # a prepared structure
        label = f"{kind}@{budget}" if kind in ("lowrank", "proximal") else kind
        x = torch.randn(tokens, layer.in_features, device=device, dtype=dtype)
        with torch.no_grad():
            weight = layer.to_dense()
        dense_w = weight.to(device, dtype)
        bias = None if layer.bias is None else layer.bias.detach().to(device, dtype)
        plans = {plan: ExportedGBLR.from_gblr(layer, plan=plan, cost=PlanCost(tokens=tokens)).to(device, dtype)
                 for plan in ("grouped", "factored", "tiled")}
        for block in BSR_BLOCKS:  # the Triton plan (its torch path in a CPU smoke run)
            plans["bsr{}x{}".format(*block)] = ExportedGBLR.from_gblr(layer, plan="bsr", block=block).to(device, dtype)
            flipped = copy.deepcopy(plans["bsr{}x{}".format(*block)])
            flipped.stage1.tokens_as_n = not flipped.stage1.tokens_as_n  # stage 1 the other way round
            plans["bsr{}x{}-flip".format(*block)] = flipped
        copied = copy.deepcopy(plans["bsr{}x{}".format(*BSR_BLOCK)])
        copied.bsr_gather = False  # t' written out between the kernels instead of gathered
        plans["bsr{}x{}-copy".format(*BSR_BLOCK)] = copied

        def dense():
            with torch.no_grad():
                nn.functional.linear(x, dense_w, bias)

        def runner(module):
            def run():
                with torch.no_grad():
                    module(x)
            return run

        failed = {}
        for plan in list(plans):  # a plan whose kernel fails to compile or run is reported, not fatal
            error = _first_call(runner(plans[plan]))
            if error is not None:
                failed[plan] = error
                print(f"{label}: plan {plan} failed: {error}")
                del plans[plan]

        with torch.no_grad():
            reference = nn.functional.linear(x[:256].float(), weight.to(device), None if bias is None else bias.float())
            errors = {plan: float((module(x[:256]).float() - reference).norm() / reference.norm())
                      for plan, module in plans.items()}
        times = _interleaved({"dense": dense, **{plan: runner(m) for plan, m in plans.items()}}, repeats, device)
        # the same calls replayed from CUDA graphs (dense too): what is left without launch costs
        graphed = {"dense": _graphed(dense, device), **{p: _graphed(runner(m), device) for p, m in plans.items()}}
        graph_times = (_interleaved(graphed, repeats, device)
                       if all(g is not None for g in graphed.values()) else None)
        dense_macs = layer.in_features * layer.out_features
        f = layer.flops() / dense_macs
        best = min(plans, key=lambda p: times[p])
        speedup = times["dense"] / times[best]
        rows.append({"structure": label, "shape": [layer.out_features, layer.in_features], "f": f,
                     "ms": times, "best_plan": best,
                     "speedup": speedup, "speedups": {n: times["dense"] / times[n] for n in plans},
                     "executed_f": {n: m.executed_flops() / dense_macs for n, m in plans.items()},
                     "relative_error": errors, "target_0.6_over_f": 0.6 / f, "fraction_of_ideal": speedup * f,
                     "failed_plans": failed,
                     "ms_cuda_graph": graph_times,
                     "speedups_cuda_graph": None if graph_times is None else
                     {n: graph_times["dense"] / graph_times[n] for n in plans}})
    return rows


def decisions(report: dict) -> dict:
    """What the numbers decide, so that one GPU call settles the defaults: the faster training
    path (with or without the host read), the "bsr" block shape and stage-1 orientation that
    do best over the structures (geometric mean of the speedups over dense), gathered vs
    written-out t', and each speed target met or missed."""
    import math

    out = {}
    train = report["train"]["ratio_vs_linear"]
    variants = {k: train[k] for k in ("gblr", "gblr sync-free") if k in train}
    if variants:
        best = min(variants, key=variants.get)
        out["training"] = {"faster": best, "ratios": variants, "target_1.3_met": variants[best] <= 1.3}
        later = {k: train[k] for k in ("gblr half dead", "gblr half dead sync-free") if k in train}
        if later:
            out["training"]["half_dead_ratios"] = later
            out["training"]["half_dead_faster"] = min(later, key=later.get)
    rows = report["export"]

    def geomean(name):
        values = [r["speedups"][name] for r in rows if name in r["speedups"]]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    bsr = sorted({n for r in rows for n in r["speedups"] if n.startswith("bsr")})
    if bsr:
        means = {n: geomean(n) for n in bsr}
        best = max(means, key=lambda n: means[n] if means[n] == means[n] else -1.0)
        out["bsr"] = {"best": best, "geomean_speedup": means}
    out["targets"] = {r["structure"]: {"f": r["f"], "best_plan": r["best_plan"], "speedup": r["speedup"],
                                       "needed": r["target_0.6_over_f"],
                                       "met": r["speedup"] >= r["target_0.6_over_f"]}
                      for r in rows if r["f"] <= 0.3}
    return out


def _print_decisions(d: dict) -> None:
    if "training" in d:
        t = d["training"]
        print(f"decide: training path {t['faster']} ({', '.join(f'{k} {v:.2f}x' for k, v in t['ratios'].items())}; "
              f"target 1.3x {'met' if t['target_1.3_met'] else 'missed'})"
              + (f"; half the components dead: {t['half_dead_faster']} ("
                 + ", ".join(f"{k} {v:.2f}x" for k, v in t["half_dead_ratios"].items()) + ")"
                 if "half_dead_ratios" in t else ""))
    if "bsr" in d:
        means = d["bsr"]["geomean_speedup"]
        print(f"decide: bsr block {d['bsr']['best']} (geometric-mean speedups: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(means.items(), key=lambda kv: -kv[1])) + ")")
    for name, t in d["targets"].items():
        print(f"target 0.6/f: {name:18s} f {t['f']:.3f} needs {t['needed']:.2f}x, {t['best_plan']} gives "
              f"{t['speedup']:.2f}x: {'met' if t['met'] else 'missed'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join("bench", "results", "gpu.json"))
    parser.add_argument("--prepare", action="store_true",
                        help=f"write the real structures to {PREPARED} (on a CPU machine) and exit")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare()
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench.gpu: no CUDA device found; skipped (use --smoke for a tiny CPU run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        train = dict(n=64, m=256, K=64, tokens=128, sigma=5.0, repeats=3)
        export = dict(size=128, tokens=256, budgets=(0.3,), repeats=3, steps=5)
    else:
        train = dict(n=768, m=3072, K=768, tokens=8192, sigma=5.0, repeats=args.repeats)
        export = dict(size=4096, tokens=8192, budgets=(0.1, 0.2, 0.3), repeats=args.repeats)
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype), "command": " ".join(["python -m bench.gpu"] + sys.argv[1:]),
        "train": train_step(device, dtype, **train),
    }
    if report["train"]["kernels_error"]:  # the structures below train GBLR layers too
        from gsmsearch.structured import GBLRLinear

        GBLRLinear.use_kernels = False
    report["export"] = export_speed(device, dtype, **export, prepared=[] if args.smoke else _prepared())
    if not args.smoke and not report["export"][-1]["structure"].startswith(tuple(PREPARED_KINDS)):
        print(f"note: no prepared real structures in {PREPARED} (python -m bench.gpu --prepare, then carry it)")
    print(f"device {report['device']}, {report['dtype']}, torch {report['torch']}, triton {report['triton']}")
    t = report["train"]
    print("train step x nn.Linear: " + ", ".join(f"{k} {v:.2f}" for k, v in t["ratio_vs_linear"].items()))
    print("memory MiB (kept for backward / step peak): " + ", ".join(
        f"{k} {v['kept_for_backward_mib']:.1f} / {'-' if v['step_peak_mib'] is None else format(v['step_peak_mib'], '.1f')}"
        for k, v in t["memory"].items()))
    print(f"fused vs unfused gradients, largest relative error: {t['fused_vs_unfused_grad_error']:.1e}; "
          f"Triton mask kernels vs torch ops, float32: {t['kernels_vs_torch_ops_grad_error_fp32']:.1e}; "
          f"sync-free vs gblr: {t['sync_free_vs_gblr_grad_error']:.1e}")
    print(f"host syncs per training step: {t['host_syncs_per_step']}")
    names = list(dict.fromkeys(n for r in report["export"] for n in r["speedups"]))
    print(f"{'export structure':18s} {'f':>6s} {'best':>9s} {'speedup':>8s} {'0.6/f':>6s} "
          + " ".join(f"{n:>9s}" for n in names) + f" {'max err':>8s}")
    for r in report["export"]:
        print(f"{r['structure']:18s} {r['f']:6.3f} {r['best_plan']:>9s} {r['speedup']:8.2f} "
              f"{r['target_0.6_over_f']:6.2f} " + " ".join(f"{r['speedups'].get(n, float('nan')):9.2f}" for n in names)
              + f" {max(r['relative_error'].values()):8.1e}")
    if report["export"] and report["export"][0]["speedups_cuda_graph"] is not None:
        print("speedup over dense, both replayed from CUDA graphs (no launch costs):")
        for r in report["export"]:
            if r["speedups_cuda_graph"]:
                print(f"  {r['structure']:18s} " + " ".join(f"{n} {v:.2f}" for n, v in r["speedups_cuda_graph"].items()))
    print("executed fraction of dense multiply-adds: " + "; ".join(
        f"{r['structure']} " + " ".join(f"{n} {v:.2f}" for n, v in r["executed_f"].items()) for r in report["export"]))
    report["decisions"] = decisions(report)
    _print_decisions(report["decisions"])
    out = args.out if not args.smoke else args.out.replace(".json", "-smoke.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
