"""The conditional denoiser of 003 section IV-B: a small UNet on the latent grid with a sinusoidal
timestep embedding, residual blocks and self-attention at its lowest resolution.

Conditioning arrives as one dict. The core reads `cond["z_image"]` and concatenates it with the
noisy label latent (003 section III: "concatenated ... used as input to the denoiser").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentseg.models.blocks import (
    Downsample,
    DualCrossAttention,
    ResBlock,
    SelfAttention,
    Stride,
    Upsample,
    conv_nd,
    norm,
    timestep_embedding,
)
from latentseg.models.text_fusion import TextCrossAttention
from latentseg.text import TextEmbedding


class DecoderHead(nn.Module):
    """The upsampling half of the denoiser UNet, ending in `out_channels` (zero-initialised)."""

    def __init__(self, spatial_dims: int, out_channels: int, channels: Sequence[int], strides: list, emb_dim: int):
        super().__init__()
        self.upsample = nn.ModuleList(
            Upsample(spatial_dims, channels[i + 1], channels[i], s) for i, s in enumerate(strides)
        )
        self.up = nn.ModuleList(ResBlock(spatial_dims, 2 * c, c, emb_dim) for c in channels)
        self.out_norm = norm(channels[0])
        self.out = conv_nd(spatial_dims, channels[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        for level in reversed(range(len(self.up))):
            if level < len(self.upsample):
                h = self.upsample[level](h, size=skips[level].shape[2:])
            h = self.up[level](torch.cat([h, skips[level]], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


class Denoiser(nn.Module):
    """f_denoiser(z_t, z_image, t) -> eps, x0 or v (whatever the model was trained to predict).

    With `heads=2` one encoder feeds two decoders, an eps head and an x0 head (004 section 2.1);
    `forward_heads` returns both from one encoder pass.

    Args:
        latent_channels: channels of the noisy label latent (k), also the output channels.
        cond_channels: channels of cond["z_image"].
        channels: width per level; one downsampling between consecutive levels.
        strides: the downsampling factor between levels (int or per axis).
        heads: 1, or 2 for (eps, x0).
        condition_attention: also inject cond["z_image"] into every encoder level by dual
            cross-attention (004 section 2.3), besides concatenating it at the input.
        text_dim: > 0: every encoder level's voxels also attend to the text tokens
            cond["text_tokens"] (padding cond["text_padding"]), 000 Eq. 2 applied to the
            denoiser's levels rather than only to the image latent.
    """

    def __init__(
        self,
        spatial_dims: int,
        latent_channels: int,
        cond_channels: int,
        channels: Sequence[int] = (64, 128),
        strides: Sequence[Stride] | None = None,
        num_heads: int = 4,
        heads: int = 1,
        condition_attention: bool = False,
        text_dim: int = 0,
    ):
        super().__init__()
        strides = list(strides) if strides is not None else [2] * (len(channels) - 1)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"{len(channels)} levels need {len(channels) - 1} strides, got {strides}")
        if heads not in (1, 2):
            raise ValueError(f"the denoiser has 1 head or 2 (eps and x0), got {heads}")
        self.emb_channels = channels[0]
        emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = conv_nd(spatial_dims, latent_channels + cond_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(spatial_dims, c, c, emb_dim) for c in channels)
        self.downsample = nn.ModuleList(
            Downsample(spatial_dims, channels[i], channels[i + 1], s) for i, s in enumerate(strides)
        )
        self.dca = nn.ModuleList(
            DualCrossAttention(spatial_dims, c, cond_channels, num_heads) for c in channels if condition_attention
        )
        self.text_attention = nn.ModuleList(
            TextCrossAttention(spatial_dims, c, text_dim, num_heads) for c in channels if text_dim > 0
        )
        top = channels[-1]
        self.mid1 = ResBlock(spatial_dims, top, top, emb_dim)
        self.mid_attn = SelfAttention(top, num_heads)
        self.mid2 = ResBlock(spatial_dims, top, top, emb_dim)
        self.heads = nn.ModuleList(
            DecoderHead(spatial_dims, latent_channels, channels, strides, emb_dim) for _ in range(heads)
        )

    def forward_heads(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], heads: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """The outputs of `heads` (default: all) from one pass of the shared encoder."""
        emb = self.time_mlp(timestep_embedding(t, self.emb_channels))
        h = self.inp(torch.cat([x_t, cond["z_image"]], dim=1))
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, emb)
            if self.dca:
                h = self.dca[level](h, cond["z_image"])
            if self.text_attention:
                h = self.text_attention[level](h, TextEmbedding(cond["text_tokens"], cond["text_padding"], None))
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        return [self.heads[i](h, skips, emb) for i in (range(len(self.heads)) if heads is None else heads)]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], head: int = 0) -> torch.Tensor:
        return self.forward_heads(x_t, t, cond, [head])[0]
