"""A Vision Transformer (pre-norm, class token, learned positions) with timm's parameter names.

One implementation for every image workload, from a 2-block ViT on 8x8 digits to ViT-B/16 on
ImageNet (:func:`vit_b16_config`).  The attention ``qkv`` and ``proj`` and the MLP ``fc1`` and
``fc2`` of every block are built through the linear factory; the patch embedding (a strided
convolution) and the classifier ``head`` are not candidates.  Parameter names follow timm's
``VisionTransformer``, so a timm ViT state dict loads with ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._registry import LinearFactory, attention_flops

__all__ = ["ViTConfig", "VisionTransformer", "vit_b16_config"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224     # square input images, image_size x image_size pixels
    patch_size: int = 16      # square patches; image_size must be a multiple
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768            # token width
    depth: int = 12           # number of transformer blocks
    heads: int = 12           # attention heads; dim must be a multiple
    mlp_ratio: float = 4.0    # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTConfig.{field} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig.dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"ViTConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image seen by every block: the patches plus the class token."""
        return self.num_patches + 1

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


def vit_b16_config(**overrides) -> ViTConfig:
    """ViT-B/16 (Dosovitskiy et al.): 224 px, patch 16, dim 768, depth 12, 12 heads, MLP 3072."""
    return dataclasses.replace(ViTConfig(), **overrides)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, linear_factory: LinearFactory, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = linear_factory(dim, 3 * dim, bias=True)
        self.proj = linear_factory(dim, dim, bias=True)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)  # (B, T, dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, linear_factory: LinearFactory, dropout: float) -> None:
        super().__init__()
        self.fc1 = linear_factory(dim, hidden, bias=True)
        self.act = nn.GELU()
        self.fc2 = linear_factory(hidden, dim, bias=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, config: ViTConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = Attention(config.dim, config.heads, linear_factory, config.dropout)
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp = Mlp(config.dim, config.mlp_hidden, linear_factory, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.in_chans, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, patches, dim)


class VisionTransformer(nn.Module):
    """``forward(images: (B, in_chans, H, W)) -> logits (B, num_classes)`` (class-token pooling)."""

    def __init__(self, config: ViTConfig, *, linear_factory: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_tokens, config.dim) * 0.02)
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*(Block(config, linear_factory) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images)  # (B, patches, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, dim)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)  # (B, T, dim)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])  # (B, num_classes)


class ViTWorkloadMixin:
    """What every workload whose model is our :class:`VisionTransformer` (built from
    ``self.config``, a :class:`ViTConfig`) shares: candidate layers, model, token and attention
    costs.  Put it before the workload base class."""

    candidate_patterns = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")

    def build_model(self, linear_factory: LinearFactory = nn.Linear) -> nn.Module:
        return VisionTransformer(self.config, linear_factory=linear_factory)

    @property
    def tokens_per_sample(self) -> int:
        return self.config.num_tokens

    def nonlinear_flops_per_sample(self, model) -> int:
        return attention_flops(self.config.depth, self.config.num_tokens, self.config.dim)

    def _vit_options(self, patch_size, dim, depth, heads, mlp_ratio, dropout) -> dict:
        return {"patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads,
                "mlp_ratio": float(mlp_ratio), "dropout": float(dropout)}
