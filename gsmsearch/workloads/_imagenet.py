"""``vit-b16-imagenet``: ViT-B/16 on an ImageNet-style folder (the paper-scale image workload).

``data_dir/train/<class>/*`` provides the training and validation splits (a stratified
``val_fraction`` of each class held out by the seed, default 1%: about 12,800 of ImageNet-1k's
1,281,167 training images); ``data_dir/val/<class>/*`` is the test split (ImageNet-1k's 50,000
validation images).  A trial's ``quality`` is measured on the held-out validation images, which
no trial trains on; the test split is only recorded.  The model is
the shared :class:`~gsmsearch.workloads._vit.VisionTransformer` with the ViT-B/16 configuration
(every size is an option, so tests run a tiny one); ``checkpoint`` optionally names a timm-format
state dict (``.safetensors``, or a ``torch.save`` file) to start from.  Needs Pillow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ._image_folder import ImageFolder, list_image_folder
from ._registry import (
    MissingFiles,
    ClassificationWorkload,
    DataSplits,
    check_positive_int,
    record_options,
    register_workload,
)
from ._splits import stratified_split_indices
from ._vit import VisionTransformer, ViTWorkloadMixin, vit_b16_config

__all__ = ["ViTB16ImageNet"]


@register_workload("vit-b16-imagenet")
class ViTB16ImageNet(ViTWorkloadMixin, ClassificationWorkload):
    default_epochs = 30
    default_batch_size = 256
    calibration_samples = 128  # 197 tokens each: 25k rows per layer
    default_lr = 1e-4
    default_weight_decay = 0.05

    def __init__(
        self,
        *,
        data_dir: Union[str, Path],
        checkpoint: Optional[Union[str, Path]] = None,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        val_fraction: float = 0.01,
    ) -> None:
        self.data_dir = Path(data_dir)
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir() or not (self.data_dir / "val").is_dir():
            raise MissingFiles(f"data_dir {str(self.data_dir)!r} must hold train/<class>/ and val/<class>/ folders")
        self.classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
        if not self.classes:
            raise MissingFiles(f"data_dir {str(self.data_dir)!r}: train/ has no class folders")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise MissingFiles(f"checkpoint {str(checkpoint)!r} is not a file")
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.pretrained = self.checkpoint is not None
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.config = vit_b16_config(
            image_size=check_positive_int("image_size", image_size), patch_size=patch_size, dim=dim,
            depth=depth, heads=heads, mlp_ratio=float(mlp_ratio), dropout=float(dropout),
            num_classes=len(self.classes),
        )
        record_options(
            self,
            {"data_dir": str(self.data_dir), "checkpoint": None if checkpoint is None else str(checkpoint),
             "image_size": image_size, "patch_size": patch_size, "dim": dim, "depth": depth,
             "heads": heads, "mlp_ratio": float(mlp_ratio), "dropout": float(dropout),
             "val_fraction": self.val_fraction},
        )

    def load_data(self, seed: int = 0) -> DataSplits:
        _, train_samples = list_image_folder(self.data_dir / "train", self.classes)
        _, test_samples = list_image_folder(self.data_dir / "val", self.classes)
        labels = [label for _, label in train_samples]
        fractions = (1.0 - self.val_fraction, self.val_fraction / 2, self.val_fraction / 2)
        train_idx, val_a, val_b = stratified_split_indices(labels, fractions, seed)
        val_idx = sorted([*val_a, *val_b])
        if not val_idx:
            raise ValueError(f"val_fraction {self.val_fraction:g} holds out no image of "
                             f"{str(self.data_dir / 'train')!r} (too few per class); raise it")
        size = self.config.image_size
        return DataSplits(
            ImageFolder([train_samples[i] for i in train_idx], size, train=True),
            ImageFolder([train_samples[i] for i in val_idx], size, train=False),
            ImageFolder(test_samples, size, train=False),
        )

    def example_batch(self, batch_size: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        size = self.config.image_size
        return (
            torch.randn(batch_size, 3, size, size, generator=generator),
            torch.randint(0, self.config.num_classes, (batch_size,), generator=generator),
        )

    def build_model(self, linear_factory=nn.Linear) -> nn.Module:
        model = VisionTransformer(self.config, linear_factory=linear_factory)
        if self.checkpoint is not None:
            load_checkpoint(model, self.checkpoint)
        return model



def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a timm-format ViT state dict into ``model``.

    Entries whose name or shape does not match (a classifier head for another class count, or
    layers a structured factory built) are skipped; a checkpoint that matches no block weight
    at all is rejected.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    usable = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    if not any(key.startswith("blocks.") for key in usable):
        raise ValueError(f"checkpoint {str(path)!r} has no weights matching this ViT's blocks")
    model.load_state_dict(usable, strict=False)
