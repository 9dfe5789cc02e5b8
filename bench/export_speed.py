"""Inference benchmark: exported GBLR execution plans and hand-crafted baselines vs dense.

For each structure: dense ``F.linear`` with the layer's dense weight, every export plan
(``"auto"`` -- ``export()``'s default --, ``"grouped"``, ``"factored"``, ``"tiled"``, ``"exact"``)
and (for reference) the trained layer's own no-grad forward, all on the same input, interleaved.  Reported: speedup over dense (median wall and CPU time), the method's
relative FLOPs f, the plan's executed FLOPs (padding included), and the achieved fraction of the
FLOP ideal 1/f (speedup x f).  Exactness of every plan is checked against the layer's forward.
"""
from __future__ import annotations

import copy

import os
import tempfile
from typing import Dict, List

import torch
from torch import nn

from gsmsearch.structured import create_linear
from gsmsearch.structured._export import ExportedGBLR

from . import structures
from ._timing import interleaved, peak_rss_delta


def _dense_module(weight: torch.Tensor, bias) -> nn.Linear:
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)


def _memory(modules: Dict[str, nn.Module], shape, threads: int) -> Dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules.items():
            path = os.path.join(tmp, "module.pt")
            torch.save(module, path)
            out[name] = peak_rss_delta(path, shape, train=False, threads=threads)
    return out


PLANS = ("auto", "grouped", "factored", "tiled", "exact")


def bench_structure(name: str, layer, tokens: int, repeats: int, threads: int, memory: bool) -> dict:
    layer = layer.eval()
    m, n = layer.out_features, layer.in_features
    x = torch.randn(tokens, n)
    with torch.no_grad():
        weight = layer.to_dense()
        dense = _dense_module(weight, layer.bias)
        plans = {plan: ExportedGBLR.from_gblr(layer, plan=plan) for plan in PLANS}
        reference = layer(x)
        errors = {plan: float((module(x) - reference).norm() / reference.norm()) for plan, module in plans.items()}

    def call(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    candidates = {"dense": call(dense), **{plan: call(module) for plan, module in plans.items()},
                  "gblr layer": call(layer)}
    times = interleaved(candidates, repeats=repeats)
    f = layer.flops() / (m * n)
    out = {
        "structure": name, "shape": [m, n], "tokens": tokens, "relative_flops": f,
        "live_components": int(layer.live_components().numel()),
        "executed_relative_flops": {plan: module.executed_flops() / (m * n) for plan, module in plans.items()},
        "groups": {plan: [len(module.column_groups) + len(module.column_tiles),
                          len(module.row_groups) + len(module.row_tiles), len(module.blocks)]
                   for plan, module in plans.items()},
        "relative_error_vs_layer": errors,
        "auto_chose": plans["auto"].plan,
        "times": times,
    }
    for plan in (*PLANS, "gblr layer"):
        speedup = times["dense"]["wall_ms"] / times[plan]["wall_ms"]
        cpu_speedup = times["dense"]["cpu_ms"] / times[plan]["cpu_ms"]
        out[f"speedup_{plan}"] = speedup
        out[f"cpu_speedup_{plan}"] = cpu_speedup
        out[f"fraction_of_ideal_{plan}"] = speedup * f if f > 0 else float("nan")
    if memory:
        out["peak_rss_delta_mib"] = _memory({"dense": dense, "auto": plans["auto"], "exact": plans["exact"]},
                                            (tokens, n), threads)
    return out


def run_structures(*, tokens=4096, repeats=7, budgets=(0.1, 0.2, 0.3), threads=1, memory=True,
                   cache_dir=None, kinds=("proximal", "digits", "minilm", "minilm-greedy", "lowrank")) -> List[dict]:
    rows = []
    for kind in kinds:
        for budget in budgets:
            if kind == "proximal":
                layer = structures.proximal(budget, cache_dir=cache_dir)
            elif kind == "minilm":
                layer = structures.minilm(budget, cache_dir=cache_dir)
            elif kind == "digits":
                layer = structures.digits_trained(budget, cache_dir=cache_dir)
            elif kind == "minilm-greedy":
                layer = structures.minilm(budget, greedy_only=True, cache_dir=cache_dir)
            else:
                layer = structures.lowrank(budget)
            row = bench_structure(f"{kind}@{budget:g}", layer, tokens, repeats, threads, memory)
            row["kind"], row["budget"] = kind, budget
            rows.append(row)
    return rows


def baseline_configs(size: int, target: float = 0.25) -> dict:
    """Candidate constructor arguments per family near ``target`` relative FLOPs on size x size;
    the closest by each layer's own ``flops()`` is benchmarked."""
    half = max(1, int(target * size / 2))  # rank r with r (2 size) = target size^2
    return {
        "lowrank": [dict(rank=half)],
        "blockdiag": [dict(num_blocks=round(1 / target))],
        "monarch": [dict(num_blocks=b) for b in (4, 8, 16)],
        "blocklowrank": [dict(num_blocks=b, rank=max(1, half // b)) for b in (2, 4, 8)],
        "blast": [dict(num_blocks=b, rank=max(1, int(target * size * size / (2 * size + b * b)))) for b in (2, 4, 8)],
        "blocksparse": [dict(block_size=bs, butterfly_size=s, lowrank_rank=q)
                        for bs in (size // 32, size // 16, size // 8) for s in (2, 4, 8, 16) for q in (0, 16, 32, 64)],
    }


def run_baselines(*, size=1024, tokens=4096, repeats=7, target=0.25, threads=1, memory=True) -> List[dict]:
    x = torch.randn(tokens, size)
    rows = []
    dense = nn.Linear(size, size).requires_grad_(False)
    for family, configs in baseline_configs(size, target).items():
        best, error = None, None
        for config in configs:
            try:
                layer = create_linear(family, size, size, **config)
            except Exception as exc:  # a family still being written elsewhere: report, go on
                error = f"{type(exc).__name__}: {exc}"
                continue
            f = layer.flops() / (size * size)
            if best is None or abs(f - target) < abs(best[1] - target):
                best = (layer, f, config)
        if best is None:
            rows.append({"family": family, "error": error})
            continue
        layer, f, config = best
        layer = layer.eval().requires_grad_(False)

        def call(module):
            def run():
                with torch.no_grad():
                    module(x)
            return run

        candidates = {"dense": call(dense), family: call(layer)}
        if family == "blocksparse":  # beside it, the same layer in one pass over all tokens
            one_pass = copy.deepcopy(layer)
            one_pass.cpu_token_chunk = tokens
            candidates["blocksparse one pass"] = call(one_pass)
        times = interleaved(candidates, repeats=repeats)
        speedup = times["dense"]["wall_ms"] / times[family]["wall_ms"]
        row = {
            "family": family, "config": config, "relative_flops": f, "shape": [size, size], "tokens": tokens,
            "times": times, "speedup": speedup,
            "cpu_speedup": times["dense"]["cpu_ms"] / times[family]["cpu_ms"],
            "fraction_of_ideal": speedup * f,
        }
        if "blocksparse one pass" in times:
            row["speedup_one_pass"] = times["dense"]["wall_ms"] / times["blocksparse one pass"]["wall_ms"]
        if memory:
            row["peak_rss_delta_mib"] = _memory({"dense": dense, family: layer}, (tokens, size), threads)
        rows.append(row)
    return rows
