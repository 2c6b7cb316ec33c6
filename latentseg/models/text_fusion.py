"""Fusing a sentence into the image latent (000 section II-B).

- attention, 000 Eq. 2: z_fused = z_i + reshape(softmax(z_i' W_q (z_t W_k)^T / sqrt(d_k)) z_t W_v),
  the image latent's voxels as queries, the text tokens as keys and values (padding masked),
  multi-head. We normalise queries and tokens first, and add a learned embedding of each voxel's
  position in the window to the queries, so that words such as "upper left" can find their place.
- concat: the pooled sentence embedding, projected, is concatenated to every voxel of z_i and
  mixed back to z_i's width by a 1x1 convolution (the "concat" ablation of 000 Table II).
"""

from __future__ import annotations

import torch
from torch import nn

from latentseg.config import ModelConfig
from latentseg.models.blocks import CrossAttention, conv_nd
from latentseg.text import TextEmbedding

TEXT_FUSIONS = ("none", "attention", "concat")


def coordinates(z: torch.Tensor) -> torch.Tensor:
    """(1, D, *S) voxel coordinates in [-1, 1] along each of z's D spatial axes."""
    axes = [torch.linspace(-1, 1, n, device=z.device, dtype=z.dtype) for n in z.shape[2:]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


class TextCrossAttention(nn.Module):
    """000 Eq. 2 on the image latent, in 2D and 3D."""

    def __init__(self, spatial_dims: int, channels: int, text_dim: int, num_heads: int):
        super().__init__()
        self.position = conv_nd(spatial_dims, spatial_dims, channels, 1)
        self.attention = CrossAttention(channels, text_dim, num_heads)

    def forward(self, z_image: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        query = z_image + self.position(coordinates(z_image))
        fused = self.attention(query, text.tokens, text.padding)
        return z_image + (fused - query)  # the residual is on z_i itself, as in Eq. 2


class TextConcat(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, text_dim: int):
        super().__init__()
        self.project = nn.Linear(text_dim, channels)
        self.mix = conv_nd(spatial_dims, 2 * channels, channels, 1)

    def forward(self, z_image: torch.Tensor, text: TextEmbedding) -> torch.Tensor:
        t = self.project(text.pooled)[(...,) + (None,) * (z_image.ndim - 2)].expand_as(z_image)
        return self.mix(torch.cat([z_image, t], dim=1))


TEXT_FUSION_MODULES = {
    "none": lambda c: None,
    "attention": lambda c: TextCrossAttention(c.spatial_dims, c.image_latent_channels, c.text_dim, c.num_heads),
    "concat": lambda c: TextConcat(c.spatial_dims, c.image_latent_channels, c.text_dim),
}


def make_text_fusion(config: ModelConfig) -> nn.Module | None:
    """The module `config.text_fusion` names (None for "none")."""
    return TEXT_FUSION_MODULES[config.text_fusion](config)
