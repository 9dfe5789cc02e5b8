"""Workloads on scikit-learn's 8x8 digits (1797 images, 10 classes): an MLP and a tiny ViT.

Splits (default ``split`` 0.6/0.2/0.2, stratified by class, drawn by the seed): 1078 training,
359 validation and 360 test images, disjoint (no image of the data set occurs twice).  The
validation split is what a trial's ``quality`` is measured on; the test split is only recorded.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._mlp import MLP
from ._registry import (
    ClassificationWorkload,
    DataSplits,
    check_fractions,
    check_positive_int,
    record_options,
    register_workload,
)
from ._splits import stratified_split_indices
from ._tensor_data import standardised_splits
from ._vit import ViTConfig, ViTWorkloadMixin

__all__ = ["DigitsMLP", "DigitsViT"]

NUM_CLASSES = 10


def read_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64) float64 in 0-16, labels (1797,) int): the data of
    ``sklearn.datasets.load_digits()``, read from the CSV file scikit-learn ships, without
    importing scikit-learn (1.6 s of imports in every fresh worker process otherwise)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the digits workloads read scikit-learn's bundled digits; install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def load_digits_splits(seed: int, fractions: Sequence[float], *, image: bool) -> DataSplits:
    """Stratified splits of the digits, standardised per pixel; ``(B, 64)`` or ``(B, 1, 8, 8)``."""
    data, target = read_digits()
    inputs = data.reshape(-1, 1, 8, 8) if image else data  # (N, 1, 8, 8) or (N, 64)
    indices = stratified_split_indices(target, fractions, seed)
    return standardised_splits(inputs, target, indices, per_feature=True)


@register_workload("digits-mlp")
class DigitsMLP(ClassificationWorkload):
    """MLP 64 -> 256 -> 256 -> 10 on the digits; ``layers.*`` are the candidates.

    Dense reaches about 0.97-0.98 test accuracy with the defaults (Adam, lr 1e-3, 30 epochs,
    batch 32) in a few seconds of CPU time.
    """

    candidate_patterns = ("layers.*",)
    default_epochs = 30
    default_batch_size = 32
    default_lr = 1e-3

    def __init__(
        self,
        *,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        split: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        if isinstance(hidden_sizes, (str, bytes)) or not list(hidden_sizes):
            raise ValueError(f"hidden_sizes must be a non-empty list of ints, got {hidden_sizes!r}")
        self.hidden_sizes = [check_positive_int("hidden_sizes", h) for h in hidden_sizes]
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.split = check_fractions("split", split)
        record_options(
            self, {"hidden_sizes": self.hidden_sizes, "dropout": self.dropout, "split": list(self.split)}
        )

    def load_data(self, seed: int = 0) -> DataSplits:
        return load_digits_splits(seed, self.split, image=False)

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (
            torch.randn(batch_size, 64, generator=generator),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        )

    def build_model(self, linear_factory=nn.Linear) -> nn.Module:
        return MLP(64, self.hidden_sizes, NUM_CLASSES, linear_factory=linear_factory, dropout=self.dropout)

    @property
    def tokens_per_sample(self) -> int:
        return 1


@register_workload("digits-vit")
class DigitsViT(ViTWorkloadMixin, ClassificationWorkload):
    """A tiny ViT on the 8x8 digits (patch 2: 16 patches + class token = 17 tokens)."""

    default_epochs = 40
    default_batch_size = 32
    default_lr = 2e-3
    default_weight_decay = 0.05

    def __init__(
        self,
        *,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        split: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        self.config = ViTConfig(
            image_size=8, patch_size=patch_size, in_chans=1, num_classes=NUM_CLASSES, dim=dim,
            depth=depth, heads=heads, mlp_ratio=float(mlp_ratio), dropout=float(dropout),
        )
        self.split = check_fractions("split", split)
        record_options(
            self,
            {**self._vit_options(patch_size, dim, depth, heads, mlp_ratio, dropout),
             "split": list(self.split)},
        )

    def load_data(self, seed: int = 0) -> DataSplits:
        return load_digits_splits(seed, self.split, image=True)

    def example_batch(self, batch_size: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return (
            torch.randn(batch_size, 1, 8, 8, generator=generator),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        )

