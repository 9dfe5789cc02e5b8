"""Workloads on Animal-MNIST (10000 28x28 grey images, 10 classes): ViT and MLP-Mixer.

The 284 exact duplicate images are dropped before splitting (9716 remain, 7:1:2 stratified, drawn
by the seed): 6801 training, 972 validation and 1943 test images, no image in two splits.  The
validation split is what a trial's ``quality`` is measured on; the test split is only recorded.

The images ship in the ``animal-mnist`` wheel as gzip pickles of numpy arrays; they are read
directly (the wheel's own loader imports tensorflow).
"""
from __future__ import annotations

import functools
import gzip
import pickle
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._mixer import MixerConfig, MlpMixer
from ._registry import (
    ClassificationWorkload,
    DataSplits,
    check_fractions,
    record_options,
    register_workload,
)
from ._resources import package_file
from ._splits import stratified_split_indices
from ._tensor_data import standardised_splits
from ._vit import ViTConfig, ViTWorkloadMixin

__all__ = ["AnimalMnistViT", "AnimalMnistMixer", "read_animal_mnist"]

NUM_CLASSES = 10
IMAGE_SIZE = 28


@functools.lru_cache(maxsize=1)
def read_animal_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """``(images (10000, 28, 28) uint8, labels (10000,) int64)`` from the installed wheel."""
    folder = "data/Animal_MNIST"
    data_path = package_file("animal_mnist", f"{folder}/animal_data_version_3.gz", pip_name="animal-mnist")
    label_path = package_file("animal_mnist", f"{folder}/animal_label_version_3.gz", pip_name="animal-mnist")
    # The wheel's own files, pickled numpy arrays (the format its loader reads).
    with gzip.open(data_path, "rb") as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)
    with gzip.open(label_path, "rb") as handle:
        labels = np.asarray(pickle.load(handle), dtype=np.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise RuntimeError(f"unexpected Animal-MNIST arrays: images {images.shape}, labels {labels.shape}")
    return images, labels


class _AnimalMnistWorkload(ClassificationWorkload):
    default_batch_size = 128
    default_lr = 1e-3
    default_weight_decay = 0.05

    split: Tuple[float, float, float]

    def load_data(self, seed: int = 0) -> DataSplits:
        images, labels = read_animal_mnist()
        # 284 images occur twice (same label); keep each once so no image is in two splits
        first_index = {}
        for index, image in enumerate(images):
            first_index.setdefault(image.tobytes(), index)
        keep = np.fromiter(sorted(first_index.values()), dtype=np.int64)
        images, labels = images[keep], labels[keep]  # 9716 images
        indices = stratified_split_indices(labels, self.split, seed)
        # (N, 1, 28, 28), one global mean/std (pixels are exchangeable)
        return standardised_splits(images[:, None], labels, indices, per_feature=False)

    def example_batch(self, batch_size: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return (
            torch.randn(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        )


@register_workload("animal-mnist-vit")
class AnimalMnistViT(ViTWorkloadMixin, _AnimalMnistWorkload):
    """A compact ViT (patch 7: 16 patches + class token = 17 tokens) on Animal-MNIST.

    Sized for CPUs (about 2.5 M multiply-adds per image forward); ``patch_size=4`` (50 tokens)
    and a wider ``dim`` are closer to a real ViT and cost about 10x more.
    """

    default_epochs = 20

    def __init__(
        self,
        *,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        split: Sequence[float] = (0.7, 0.1, 0.2),
    ) -> None:
        self.config = ViTConfig(
            image_size=IMAGE_SIZE, patch_size=patch_size, in_chans=1, num_classes=NUM_CLASSES,
            dim=dim, depth=depth, heads=heads, mlp_ratio=float(mlp_ratio), dropout=float(dropout),
        )
        self.split = check_fractions("split", split)
        record_options(
            self,
            {**self._vit_options(patch_size, dim, depth, heads, mlp_ratio, dropout),
             "split": list(self.split)},
        )



@register_workload("animal-mnist-mixer")
class AnimalMnistMixer(_AnimalMnistWorkload):
    """An MLP-Mixer (patch 7: 16 patches) on Animal-MNIST, sized for CPUs.

    ``tokens_per_sample`` is the patch count (rows of the channel-mixing layers); the
    token-mixing layers process ``dim`` rows per sample -- use ``layer_tokens_per_sample``.
    """

    candidate_patterns = (
        "blocks.*.mlp_tokens.fc1", "blocks.*.mlp_tokens.fc2",
        "blocks.*.mlp_channels.fc1", "blocks.*.mlp_channels.fc2",
    )
    default_epochs = 20

    def __init__(
        self,
        *,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 3,
        token_mlp_ratio: float = 0.5,
        channel_mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        split: Sequence[float] = (0.7, 0.1, 0.2),
    ) -> None:
        self.config = MixerConfig(
            image_size=IMAGE_SIZE, patch_size=patch_size, in_chans=1, num_classes=NUM_CLASSES,
            dim=dim, depth=depth, token_mlp_ratio=float(token_mlp_ratio),
            channel_mlp_ratio=float(channel_mlp_ratio), dropout=float(dropout),
        )
        self.split = check_fractions("split", split)
        record_options(
            self,
            {"patch_size": patch_size, "dim": dim, "depth": depth,
             "token_mlp_ratio": float(token_mlp_ratio), "channel_mlp_ratio": float(channel_mlp_ratio),
             "dropout": float(dropout), "split": list(self.split)},
        )

    def build_model(self, linear_factory=nn.Linear) -> nn.Module:
        return MlpMixer(self.config, linear_factory=linear_factory)

    @property
    def tokens_per_sample(self) -> int:
        return self.config.num_patches
