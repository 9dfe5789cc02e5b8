"""In-memory (inputs, labels) data sets: standardised with train statistics, wrapped as splits."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._registry import DataSplits

__all__ = ["standardised_splits"]


def standardised_splits(
    inputs: np.ndarray,
    labels: np.ndarray,
    indices: Tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    per_feature: bool,
) -> DataSplits:
    """TensorDataset splits of ``(inputs[idx], labels[idx])``, inputs standardised.

    Mean and standard deviation come from the training split only, per feature (every entry of
    ``inputs.shape[1:]``) or global; constant features are left centred, not divided by zero.
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    train = inputs[indices[0]]
    if per_feature:
        mean, std = train.mean(axis=0), train.std(axis=0)
    else:
        mean, std = train.mean(), train.std()
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    datasets = [
        TensorDataset(
            torch.from_numpy((inputs[idx] - mean) / std).float(),
            torch.from_numpy(np.asarray(labels)[idx]).long(),
        )
        for idx in indices
    ]
    return DataSplits(*datasets)
