"""Image encoder, label encoder and label decoder of LDSeg (003 section IV-B).

All three are ResNet-style stacks without skip connections. The encoders downsample once per
entry of `strides`; the decoder mirrors them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentseg.models.blocks import (
    Downsample,
    ResBlock,
    SelfAttention,
    Stride,
    as_tuple,
    conv_nd,
    norm,
    transposed_conv_nd,
)


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit standard deviation per sample (003 section III: the standardized latent)."""
    dims = tuple(range(1, z.ndim))
    mean = z.mean(dim=dims, keepdim=True)
    var = z.var(dim=dims, keepdim=True, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def _check_widths(channels: Sequence[int], strides: Sequence[Stride]) -> None:
    if len(channels) != len(strides) + 1:
        raise ValueError(
            f"need one channel width per resolution: {len(strides)} downsamplings take "
            f"{len(strides) + 1} widths, got {list(channels)}"
        )


class Encoder(nn.Module):
    """One (strided convolution, residual block[, self-attention]) stage per stride.

    The first stage downsamples the input directly, as MONAI's UNet does: no convolution runs at
    full resolution, where 3D volumes make it the most expensive layer of the network.

    Args:
        channels: feature widths, one per resolution; channels[0] (full resolution) is the
            decoder's, the encoder's first stage reads the input channels.
        strides: the downsampling factor of each stage (an int or one per axis).
        attention_stages: how many of the last stages end in multi-head self-attention.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[Stride],
        attention_stages: int = 0,
        num_heads: int = 4,
    ):
        super().__init__()
        _check_widths(channels, strides)
        widths = [in_channels, *channels[1:]]
        stages = []
        for i, stride in enumerate(strides):
            layers: list[nn.Module] = [
                Downsample(spatial_dims, widths[i], widths[i + 1], stride),
                ResBlock(spatial_dims, channels[i + 1], channels[i + 1]),
            ]
            if i >= len(strides) - attention_stages:
                layers.append(SelfAttention(channels[i + 1], num_heads))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_norm = norm(channels[-1])
        self.out = conv_nd(spatial_dims, channels[-1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The latent and the features at every finer resolution, finest first (the input itself
        at full resolution)."""
        h = x
        features = []
        for stage in self.stages:
            features.append(h)
            h = stage(h)
        return self.out(F.silu(self.out_norm(h))), features


class ImageEncoder(Encoder):
    """X -> z_image (003 Eq. 9); self-attention in the last two stages by default."""

    def __init__(self, spatial_dims, in_channels, out_channels, channels, strides, attention_stages=2, num_heads=4):
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, attention_stages, num_heads)


class LabelEncoder(Encoder):
    """One-hot y -> standardized z_label (003 Eq. 10), mean 0 and std 1 per sample."""

    def __init__(self, spatial_dims, num_classes, latent_channels, channels, strides):
        super().__init__(spatial_dims, num_classes, latent_channels, channels, strides, attention_stages=0)

    def forward(self, y_onehot: torch.Tensor) -> torch.Tensor:
        return standardize(super().forward(y_onehot))


class DownsampleEncoder(nn.Module):
    """The ablations of 000 Table II: average pooling by the encoders' total stride, then a 1x1
    convolution to the latent's channels (a linear map per voxel, so that the denoiser keeps its
    input width). `image_encoder=downsample` is zeta_2 (no image feature extractor),
    `label_encoder=downsample` zeta_3 (a plain dimensionality reduction of the one-hot label,
    standardized like the learned one)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, strides: Sequence[Stride], standardized: bool
    ):
        super().__init__()
        factors = [as_tuple(s, spatial_dims) for s in strides]
        self.kernel = tuple(math.prod(f[d] for f in factors) for d in range(spatial_dims))
        self.pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[spatial_dims]
        self.out = conv_nd(spatial_dims, in_channels, out_channels, 1)
        self.standardized = standardized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(self.pool(x, self.kernel, self.kernel, ceil_mode=True))
        return standardize(z) if self.standardized else z


class LabelDecoder(nn.Module):
    """z -> class logits at full resolution (003 Eq. 13): a ResUNet decoder without skips.

    Each level is a residual block and a transposed convolution whose kernel equals its stride;
    the last one maps straight to class logits, as MONAI's UNet does. Convolutions at full
    resolution would dominate the cost in 3D, and the decoder runs once per sample.

    With `skip_channels` it also takes the image encoder's features at every finer resolution,
    the input image at full resolution included (skips from the image side only; the label
    latent still carries the shape), the remedy NOTES.md proposes for structures a 1/16 latent
    cannot hold; channels[0] is then the width at full resolution. `fuse_kernel` is the kernel of
    the convolution that merges each skip (1: pointwise; the residual block that follows mixes space).
    Returns logits; the softmax of 003 section IV-B is applied by the loss and by sampling.
    """

    def __init__(
        self,
        spatial_dims: int,
        latent_channels: int,
        num_classes: int,
        channels: Sequence[int],
        strides: Sequence[Stride],
        skip_channels: Sequence[int] | None = None,
        full_resolution_skip: bool = True,
        fuse_kernel: int = 3,
    ):
        super().__init__()
        _check_widths(channels, strides)
        self.full_resolution_skip = skip_channels is not None and full_resolution_skip
        self.inp = conv_nd(spatial_dims, latent_channels, channels[-1], 3, padding=1)
        coarse_to_fine = list(reversed(range(1, len(strides))))
        self.stages = nn.ModuleList(
            nn.Sequential(
                ResBlock(spatial_dims, channels[i + 1], channels[i + 1]),
                transposed_conv_nd(spatial_dims, channels[i + 1], channels[i], strides[i]),
            )
            for i in coarse_to_fine
        )
        self.last = ResBlock(spatial_dims, channels[1], channels[1])
        self.last_norm = norm(channels[1])
        self.fuse = None
        if skip_channels is not None:
            pad = fuse_kernel // 2
            self.fuse = nn.ModuleList(
                conv_nd(spatial_dims, channels[i] + skip_channels[i], channels[i], fuse_kernel, padding=pad)
                for i in coarse_to_fine
            )
        if not self.full_resolution_skip:  # the last step maps straight to logits, as MONAI's UNet does
            self.to_logits = transposed_conv_nd(spatial_dims, channels[1], num_classes, strides[0])
        else:
            self.to_full = transposed_conv_nd(spatial_dims, channels[1], channels[0], strides[0])
            self.fuse_full = conv_nd(spatial_dims, channels[0] + skip_channels[0], channels[0], 3, padding=1)
            self.to_logits = conv_nd(spatial_dims, channels[0], num_classes, 1)

    def forward(self, z: torch.Tensor, skips: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if (self.fuse is None) != (skips is None):
            raise ValueError("image features are needed exactly when the decoder was built with skip_channels")
        h = self.inp(z)
        for j, stage in enumerate(self.stages):
            h = stage(h)
            if self.fuse is not None:  # skips are finest first; the stages run coarse to fine
                h = h + self.fuse[j](torch.cat([h, skips[len(self.stages) - j]], dim=1))
        h = F.silu(self.last_norm(self.last(h)))
        if not self.full_resolution_skip:
            return self.to_logits(h)
        h = self.to_full(h)
        h = h + self.fuse_full(torch.cat([h, skips[0]], dim=1))
        return self.to_logits(F.silu(h))
