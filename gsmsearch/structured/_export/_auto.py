"""The "auto" plan: build the candidate plans and keep the one that runs fastest here."""
from __future__ import annotations

import time
import warnings
from typing import List

import numpy as np
import torch

CALIBRATION_TOKENS = 2048  # rows of the calibration batch "auto" times the candidate plans on


def _fastest(candidates: List["ExportedGBLR"], rounds: int = 5) -> "ExportedGBLR":
    """The candidate with the lowest wall time on a random calibration batch: rounds interleave
    the candidates (so a burst of load hits all of them), and each keeps its best round (the
    least disturbed measurement), after one warm-up call each."""
    import time

    first = candidates[0]
    reference = next(iter(first.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    x = torch.randn(CALIBRATION_TOKENS, first.in_features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        kept = []
        for candidate in candidates:
            try:
                candidate(x)  # warm-up (and, for "bsr", the Triton kernels' compilation)
            except Exception as error:  # noqa: BLE001 - a Triton that rejects the kernel
                if candidate.plan != "bsr":
                    raise
                warnings.warn(f"export: the bsr plan failed on this device and is skipped ({error})")
                continue
            kept.append(candidate)
    candidates = kept
    best = [float("inf")] * len(candidates)
    with torch.no_grad():
        for _ in range(rounds):
            for i, candidate in enumerate(candidates):
                sync()
                started = time.perf_counter()
                candidate(x)
                sync()
                best[i] = min(best[i], time.perf_counter() - started)
    return candidates[int(np.argmin(best))]
