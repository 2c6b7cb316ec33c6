"""TextDiff (001): a frozen pretrained DDPM UNet as the image encoder, a frozen text encoder, and a
trained head: multi-scale cross-modal attention (Eq. 3) and a pixel classifier.

For each noise level t in `feature_timesteps` the image is noised (Eq. 1) and passed once through
the frozen UNet; the outputs of the decoder blocks in `feature_blocks` are taken. Each block's
features are projected to `feature_channels` and fused with the text at the block's own
resolution (`text_fusion`):
- attention: the pixels attend to the text tokens, H = softmax(h W_q (t W_k)^T / sqrt(d)) t W_v
  (Eq. 3, multi-head, padding masked), added to h as in 000 Eq. 2, with a learned position term on
  the queries so that "upper right" can find its place; one module per block, shared over t;
- concat: the pooled sentence embedding is joined to every pixel (the paper's ablation without
  multi-scale attention, Table 2 zeta_2);
- none: no text (Table 2 zeta_1).
The results are upsampled bilinearly to the window's size and concatenated (over blocks and
t), and 1x1 convolutions classify each pixel. Only the head trains (Dice + CE); a fresh noise draw
per sample gives several samples per image and an uncertainty map.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from latentseg.config import ModelConfig
from latentseg.diffusion import DiffusionSchedule
from latentseg.models.backbone import FeatureExtractor, build_unet, pad_to_multiple
from latentseg.models.blocks import norm
from latentseg.models.segmenter import Losses, dice_ce
from latentseg.models.text_fusion import TEXT_FUSIONS, TextConcat, TextCrossAttention
from latentseg.text import TextEmbedding


def check_textdiff_config(config: ModelConfig) -> None:
    if config.spatial_dims != 2:
        raise ValueError(f"textdiff works on 2D images (a 2D DDPM UNet), the data is {config.spatial_dims}D")
    if not config.backbone_config:
        raise ValueError("textdiff needs a pretrained DDPM UNet: model.backbone=FOLDER (see `latentseg pretrain-ddpm`)")
    if config.text_fusion not in TEXT_FUSIONS:
        raise ValueError(f"text_fusion must be one of {', '.join(TEXT_FUSIONS)}, got {config.text_fusion!r}")
    if config.text_fusion != "none" and config.text_dim < 1:
        raise ValueError("a text model needs text_dim (set by `train` from the text encoder)")
    if config.feature_channels % config.num_heads:
        raise ValueError(f"feature_channels {config.feature_channels} cannot be split into {config.num_heads} heads")


class BlockFusion(nn.Module):
    """One decoder block's features, projected to `width` and fused with the text."""

    def __init__(self, channels: int, width: int, fusion: str, text_dim: int, num_heads: int):
        super().__init__()
        self.project = nn.Sequential(norm(channels), nn.Conv2d(channels, width, 1))
        self.text = None
        if fusion == "attention":  # 001 Eq. 3
            self.text = TextCrossAttention(2, width, text_dim, num_heads)
        elif fusion == "concat":
            self.text = TextConcat(2, width, text_dim)

    def forward(self, h: torch.Tensor, text: TextEmbedding | None) -> torch.Tensor:
        h = self.project(h)
        return self.text(h, text) if self.text is not None else h


class TextDiffSegmenter(nn.Module):
    """001's model: frozen DDPM UNet features + text -> per-pixel classes (2D).

    Args:
        config: `backbone_config` (the UNet's diffusers config, filled by `train`), `feature_blocks`,
            `feature_timesteps`, `feature_channels`, `text_fusion`, `num_classes`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_textdiff_config(config)
        self.config = c = config
        self.schedule = DiffusionSchedule(c.schedule, c.num_timesteps)
        unet = build_unet(c.backbone_config)
        self.multiple = 2 ** (len(unet.config.block_out_channels) - 1)  # the UNet's total downsampling
        self.features = FeatureExtractor(unet, c.feature_blocks, c.feature_timesteps, self.schedule)
        width = c.feature_channels
        self.fusions = nn.ModuleList(
            BlockFusion(ch, width, c.text_fusion, c.text_dim, c.num_heads) for ch in self.features.channels
        )
        total = width * len(c.feature_blocks) * len(c.feature_timesteps)
        self.classifier = nn.Sequential(  # the pixel classifier: an MLP per pixel as 1x1 convolutions
            nn.Conv2d(total, 128, 1),
            norm(128),
            nn.ReLU(),
            nn.Conv2d(128, 32, 1),
            norm(32),
            nn.ReLU(),
            nn.Conv2d(32, c.num_classes, 1),
        )
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def check_text(self, text: TextEmbedding | None) -> None:
        if self.config.text_fusion != "none" and text is None:
            raise ValueError("this model was trained with text; give each image its sentence (or --prompt)")
        if self.config.text_fusion == "none" and text is not None:
            raise ValueError("this model was trained without text; it takes no prompt or text file")

    def cache_features(self, max_megabytes: float) -> None:
        """Keep each training image's backbone features, computed once with noise seeded by the
        image's content (fixed noise per image, as Baranchuk et al. train their pixel classifiers).
        The backbone is frozen, so only the head then runs per step; images must repeat exactly
        (augmentation off, the patch the whole image) for the cache to be hit."""
        self._cache: dict[bytes, list[list[torch.Tensor]]] = {}
        self._cache_bytes, self._cache_limit = 0, max_megabytes * 2**20

    def _features(self, x: torch.Tensor, generator: torch.Generator | None) -> list[list[torch.Tensor]]:
        if not (self.training and hasattr(self, "_cache")):
            return self.features(x, generator)
        per_sample = []
        for xi in x.split(1):
            key = hashlib.sha1(xi.detach().cpu().numpy().tobytes()).digest()
            found = self._cache.get(key)
            if found is None:
                seeded = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
                found = self.features(xi, seeded)
                size = sum(f.numel() * f.element_size() for per_t in found for f in per_t)
                if self._cache_bytes + size <= self._cache_limit:
                    self._cache[key] = found
                    self._cache_bytes += size
            per_sample.append(found)
        return [
            [torch.cat([s[i][j] for s in per_sample]) for j in range(len(self.config.feature_blocks))]
            for i in range(len(self.config.feature_timesteps))
        ]

    def logits(
        self, image: torch.Tensor, text: TextEmbedding | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C_in, H, W) image -> (B, num_classes, H, W) logits, one noise draw per t."""
        self.check_text(text)
        x, (h, w) = pad_to_multiple(image, self.multiple)
        fused = [
            fusion(feature, text)
            for per_t in self._features(x, generator)
            for fusion, feature in zip(self.fusions, per_t, strict=True)
        ]
        return self.classify(fused, x.shape[2:])[:, :, :h, :w]

    def classify(self, fused: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        """The pixel classifier on the concatenation of the fused features, each upsampled
        bilinearly to `size`. Computed without building that concatenation: bilinear upsampling
        and the first 1x1 convolution are both linear per channel, so each block's share of the
        first layer is applied at the block's own resolution, the shares of one resolution are
        summed, and each sum is upsampled once (the same numbers, several times fewer operations)."""
        first = self.classifier[0]
        width = fused[0].shape[1]
        by_size: dict[tuple, torch.Tensor] = {}
        for k, feature in enumerate(fused):
            share = F.conv2d(feature, first.weight[:, k * width : (k + 1) * width])
            key = tuple(feature.shape[2:])
            by_size[key] = by_size[key] + share if key in by_size else share
        hidden = sum(F.interpolate(a, size=size, mode="bilinear") for a in by_size.values())
        return self.classifier[1:](hidden + first.bias[:, None, None])

    def training_losses(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        gamma: float = 2.0,
        lam: float = 1.0,
        generator: torch.Generator | None = None,
        timesteps: str = "uniform",
        last_stage_t: str = "zero",
        text: TextEmbedding | None = None,
        importance=None,
    ) -> Losses:
        """CE + gamma * Dice of the head (the backbone and text encoder are frozen); no diffusion loss.
        The timestep options of `LatentSegmenter.training_losses` do not apply (the feature
        timesteps are fixed), and `check_train_config` refuses them for this mode."""
        segmentation = dice_ce(self.logits(image, text, generator), label, gamma, self.dice).mean()
        return Losses(segmentation, segmentation, torch.zeros((), device=image.device))

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        num_samples: int = 1,
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
        middle_steps: int = 0,
        text: TextEmbedding | None = None,
        final_head: str = "eps",
    ) -> torch.Tensor:
        """(num_samples, B, C, H, W) probabilities, each from its own noise draws (the sampler
        settings of the diffusion models do not apply: the backbone runs once per t)."""
        if sampler != "ddim":
            raise ValueError("a textdiff model has no staged sampler; it runs its backbone once per feature timestep")
        return torch.stack([self.logits(image, text, generator).softmax(1) for _ in range(num_samples)])
