"""MLP-Mixer (Tolstikhin et al. 2021) with timm's parameter names.

Every block has a token-mixing MLP (``mlp_tokens.fc1/fc2``: linear over the patch axis, applied to
each of the ``dim`` channels) and a channel-mixing MLP (``mlp_channels.fc1/fc2``: linear over
channels, applied to each patch); all four are built through the linear factory.  Note the
token-mixing layers process ``dim`` rows per sample and the channel-mixing ones ``num_patches``
(see ``Workload.layer_tokens_per_sample``).  The stem (a strided convolution) and the classifier
``head`` are not candidates.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._registry import LinearFactory
from ._vit import Mlp

__all__ = ["MixerConfig", "MlpMixer"]


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    image_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 128            # channels per patch
    depth: int = 4
    token_mlp_ratio: float = 0.5   # token-mixing hidden width = token_mlp_ratio * dim
    channel_mlp_ratio: float = 4.0 # channel-mixing hidden width = channel_mlp_ratio * dim
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MixerConfig.{field} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MixerConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class MixerBlock(nn.Module):
    def __init__(self, config: MixerConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        token_hidden = max(1, int(config.dim * config.token_mlp_ratio))
        channel_hidden = max(1, int(config.dim * config.channel_mlp_ratio))
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp_tokens = Mlp(config.num_patches, token_hidden, linear_factory, config.dropout)
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp_channels = Mlp(config.dim, channel_hidden, linear_factory, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, patches, dim); token mixing works on (B, dim, patches)
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    """``forward(images: (B, in_chans, H, W)) -> logits (B, num_classes)`` (mean pooling)."""

    def __init__(self, config: MixerConfig, *, linear_factory: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Module()
        self.stem.proj = nn.Conv2d(
            config.in_chans, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.blocks = nn.Sequential(*(MixerBlock(config, linear_factory) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem.proj(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))  # (B, num_classes)
