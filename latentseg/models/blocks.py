"""Building blocks shared by every network, for any `spatial_dims` (2 or 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Stride = int | Sequence[int]


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv2d or nn.Conv3d."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(*args, **kwargs)


def transposed_conv_nd(spatial_dims: int, in_channels: int, out_channels: int, stride: Stride) -> nn.Module:
    """A transposed convolution whose kernel equals its stride: each voxel becomes a block, no overlap."""
    stride = as_tuple(stride, spatial_dims)
    cls = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
    return cls(in_channels, out_channels, kernel_size=stride, stride=stride)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide `channels`."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


def as_tuple(stride: Stride, spatial_dims: int) -> tuple[int, ...]:
    """A stride (or scale factor) per spatial axis."""
    if isinstance(stride, int):
        return (stride,) * spatial_dims
    stride = tuple(int(s) for s in stride)
    if len(stride) != spatial_dims:
        raise ValueError(f"stride {stride} does not have {spatial_dims} entries")
    return stride


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; Ho et al. 2020): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """Pre-activation residual block: GN-SiLU-conv-GN-SiLU-conv, optional timestep conditioning.

    The timestep embedding predicts a per-channel scale and shift after the second norm
    (as in improved-diffusion's `use_scale_shift_norm`).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, emb_dim: int | None = None):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv_nd(spatial_dims, in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            if emb is None:
                raise ValueError("this block needs a timestep embedding")
            scale, shift = self.emb(F.silu(emb)).reshape(*emb.shape[:1], -1, *([1] * (h.ndim - 2))).chunk(2, 1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all voxels of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.norm = norm(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, *spatial)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, prod(S), C)"""
    return x.flatten(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of a feature map's voxels (queries) over another feature map's voxels
    or a token sequence (keys and values), with a residual connection; any spatial_dims.

    Args:
        channels: channels of the query map (also of the output).
        context_channels: channels of the context.
    """

    def __init__(self, channels: int, context_channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.norm = norm(channels)
        self.norm_context = nn.LayerNorm(context_channels)
        self.attn = nn.MultiheadAttention(
            channels, num_heads, kdim=context_channels, vdim=context_channels, batch_first=True
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, *S); context: (B, C_ctx, *S') or (B, L, C_ctx) tokens; padding_mask: (B, L), True = padding."""
        ctx = self.norm_context(_tokens(context) if context.ndim > 3 else context)
        out, _ = self.attn(_tokens(self.norm(x)), ctx, ctx, key_padding_mask=padding_mask, need_weights=False)
        return x + out.transpose(1, 2).reshape(x.shape)


class DualCrossAttention(nn.Module):
    """DCA (004 section 2.3): two cascaded cross-attention blocks in which the condition features
    and the noisy-mask features take turns as the query. The condition map is average-pooled to
    the mask features' grid and projected to their width; the mask features are returned.
    """

    def __init__(self, spatial_dims: int, channels: int, cond_channels: int, num_heads: int = 4):
        super().__init__()
        self.proj = conv_nd(spatial_dims, cond_channels, channels, 1)
        self.cond_from_mask = CrossAttention(channels, channels, num_heads)  # query: condition
        self.mask_from_cond = CrossAttention(channels, channels, num_heads)  # query: noisy mask
        self.pool = [F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d][spatial_dims - 1]

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = self.proj(self.pool(cond, [int(n) for n in h.shape[2:]]))  # plain ints: ONNX export needs a fixed size
        c = self.cond_from_mask(c, h)
        return self.mask_from_cond(h, c)


class Downsample(nn.Module):
    """Strided 3x3 convolution; the stride may differ per axis (anisotropic volumes)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: Stride = 2):
        super().__init__()
        stride = as_tuple(stride, spatial_dims)
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by a per-axis factor, then a 3x3 convolution."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, scale: Stride = 2):
        super().__init__()
        self.scale = as_tuple(scale, spatial_dims)
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """`size`, when given, overrides the factor (to meet a skip connection of odd size)."""
        if size is not None:
            return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))
