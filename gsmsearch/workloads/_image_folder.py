"""An ImageNet-style folder data set (``root/<class>/<image>``) read with Pillow."""
from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._registry import MissingFiles

__all__ = ["ImageFolder", "list_image_folder", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def list_image_folder(root: Union[str, Path], classes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """``(classes, [(path, label), ...])`` in sorted order; classes are the sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFiles(f"image folder {str(root)!r} does not exist")
    if classes is None:
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise MissingFiles(f"image folder {str(root)!r} has no class sub-folders")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a class missing from this split
        samples.extend(
            (path, label) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES
        )
    return list(classes), samples


class ImageFolder(Dataset):
    """``(image (3, size, size) float, label)`` items, normalised with the ImageNet statistics.

    Training items: shorter side resized to ``size / 0.875``, random ``size`` crop, random
    horizontal flip.  Evaluation items: the same resize and a centre crop.
    """

    def __init__(self, samples: Sequence[Tuple[Path, int]], image_size: int, *, train: bool) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image  # Pillow: required for image folders

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
            resize_to = int(round(self.image_size / 0.875))
            scale = resize_to / min(image.size)
            image = image.resize(
                (max(resize_to, round(image.width * scale)), max(resize_to, round(image.height * scale))),
                Image.BILINEAR,
            )
            free_x, free_y = image.width - self.image_size, image.height - self.image_size
            if self.train:
                left, top = random.randint(0, free_x), random.randint(0, free_y)
            else:
                left, top = free_x // 2, free_y // 2
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
            if self.train and random.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        pixels = (pixels - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label  # (3, H, W)
