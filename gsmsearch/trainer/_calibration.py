"""What a layer's inputs look like, for ``budget_allocation: activation``.

``global`` shares a model's FLOP budget among its layers by the spectra of their dense weights
(``gsmsearch.structured.allocate_budgets``): the proxy for what a layer loses at a cost is the
relative truncated-SVD error of W.  What the network loses is the error of the layer's *output*,
E ||(W - W') x||^2 = ||(W - W') C^{1/2}||_F^2 with C = E[x x^T] the second moment of its inputs.
``activation`` therefore gives ``allocate_budgets`` the matrices W C^{1/2} instead of W: same
shapes and costs, spectra that count the directions the inputs actually use (a weight direction
that meets no input energy is cheap to drop).  C comes from a few batches of the training split
run through the trained dense model (calibration; the evaluation splits are never read).

Every trial of a study that starts from one dense model calibrates on the same batches, and
every rank of a data-parallel trial builds the same model: :func:`cached_input_moments` computes
the moments once per (dense model, workload, seed, calibration) and reads them back after, under
the dense cache's file lock (``_dense_cache.written_once``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..workloads import move_to_device

__all__ = ["input_second_moments", "cached_input_moments", "activation_weighted"]


@torch.no_grad()
def input_second_moments(model: nn.Module, targets: List[Tuple[str, nn.Module]], workload, splits, *,
                         samples: int = 2048, batch_size: int = 256,
                         device: str = "cpu") -> Dict[str, torch.Tensor]:
    """name -> E[x x^T] (float64, in x in) of each target layer's input rows, over the first
    ``samples`` training samples in the split's order (deterministic), every token a row --
    except padding: where a batch carries an ``attention_mask`` (B, T), a layer input shaped
    (B, T, d) contributes only its unmasked tokens.  Workloads whose samples are long sequences
    ask for fewer (``Workload.calibration_samples``)."""
    sums: Dict[str, torch.Tensor] = {}
    rows: Dict[str, int] = {}
    valid = [None]  # the current batch's (B, T) token mask, if any

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            mask = valid[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]  # (tokens, d): the real tokens only
            x = x.reshape(-1, x.shape[-1]).double()
            product = x.T @ x
            sums[name] = sums[name] + product if name in sums else product
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    hooks = [module.register_forward_hook(hook_for(name)) for name, module in targets]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in splits.loader("train", batch_size, shuffle=False):
            batch = move_to_device(batch, device)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            valid[0] = mask.bool() if mask is not None else None
            workload.forward(model, batch)
            seen += batch_size
            if seen >= samples:
                break
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    missing = [name for name, _ in targets if name not in sums]
    if missing:
        raise RuntimeError(f"calibration saw no input for layer(s) {missing}")
    return {name: (sums[name] / rows[name]).cpu() for name, _ in targets}


def calibration_key(model: nn.Module, targets: List[Tuple[str, nn.Module]], workload, *, seed: int,
                    samples: int, batch_size: int, device: str) -> str:
    """The cache key of :func:`input_second_moments` of ``model``'s ``targets``: every parameter
    and buffer of the model (the inputs of a layer depend on all the layers before it), the
    targets, the workload's name, options and data seed, the calibration's size, where it runs
    (device type, CPU threads: reductions in another order give other bits) and the code of the
    workload's module and of this one."""
    from ._dense_cache import code_digest

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    kind = torch.device(device).type
    digest.update(json.dumps({
        "targets": [name for name, _ in targets], "workload": workload.name, "options": workload.options(),
        "seed": seed, "samples": samples, "batch_size": batch_size, "device": kind,
        "threads": torch.get_num_threads() if kind == "cpu" else None,
    }, sort_keys=True, default=str).encode())
    code = code_digest((type(workload).__module__, __name__))[:12]
    return f"moments-{workload.name}-s{seed}-{digest.hexdigest()[:24]}-{code}"


def cached_input_moments(model: nn.Module, targets: List[Tuple[str, nn.Module]], workload, splits, *,
                         seed: int, samples: int = 2048, batch_size: int = 256, device: str = "cpu",
                         cache_dir=None) -> Dict[str, torch.Tensor]:
    """:func:`input_second_moments`, from the cache in ``cache_dir / "calibration"`` when the same
    calibration of the same model was made before (``splits``: a callable returning the splits,
    called only when the moments are computed; see the module docstring)."""
    from safetensors.torch import load_file

    from ._dense_cache import default_cache_dir, written_once

    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "calibration"
    key = calibration_key(model, targets, workload, seed=seed, samples=samples, batch_size=batch_size,
                          device=device)

    def compute():
        moments = input_second_moments(model, targets, workload, splits(), samples=samples,
                                       batch_size=batch_size, device=device)
        return _Tensors(moments), {"key": key}

    return load_file(str(written_once(folder / f"{key}.safetensors", compute)))


class _Tensors:
    """A mapping of tensors as ``written_once`` saves a module: through ``state_dict()``."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.tensors)


def activation_weighted(weight: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """W C^{1/2} (float64): its singular values are the output-error spectrum of W under inputs
    with second moment C (C^{1/2} the symmetric square root; negative rounding clamped to 0)."""
    evals, evecs = torch.linalg.eigh(moment.double())
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return weight.detach().to("cpu", torch.float64) @ root
