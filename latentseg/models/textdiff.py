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
from torch import nn

from latentseg.config import Config, ModelConfig, SampleConfig, TrainConfig, concrete_sampling
from latentseg.diffusion import DiffusionSchedule
from latentseg.models.backbone import FeatureExtractor, build_unet, pad_to_multiple
from latentseg.models.blocks import norm
from latentseg.models.losses import Losses, dice_ce, soft_dice_loss
from latentseg.models.objective import Phase
from latentseg.models.text_fusion import TextConcat, TextCrossAttention
from latentseg.schema import problems as schema_problems
from latentseg.text import TextEmbedding


def textdiff_problems(config: ModelConfig) -> list[str]:
    found = schema_problems(config)
    if config.spatial_dims != 2:
        found.append(f"textdiff works on 2D images (a 2D DDPM UNet), the data is {config.spatial_dims}D")
    if not config.backbone_config:
        found.append("textdiff needs a pretrained DDPM UNet: model.backbone=FOLDER (see `latentseg pretrain-ddpm`)")
    if config.text_fusion != "none" and config.text_dim < 1:
        found.append("a text model needs text_dim (set by `train` from the text encoder)")
    if config.feature_channels % config.num_heads:
        found.append(f"feature_channels {config.feature_channels} cannot be split into {config.num_heads} heads")
    return found


def check_textdiff_config(config: ModelConfig) -> None:
    problems = textdiff_problems(config)
    if problems:
        raise ValueError("; ".join(problems))


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
        self.dice = soft_dice_loss()

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

    # --- training ---------------------------------------------------------------------------

    def objective(self, config: Config) -> HeadObjective:
        return HeadObjective(self, config.train.gamma_dice)

    def phases(self, train: TrainConfig) -> list[Phase]:
        """None: the backbone comes pre-trained and stays frozen; only the head trains."""
        return []

    def freeze(self, part: str) -> None:
        raise ValueError(f"{part!r} is not a pre-trained part of a textdiff model")

    def prepare_training(self, train: TrainConfig) -> None:
        if train.feature_cache_mb > 0:
            self.cache_features(train.feature_cache_mb)

    def load_pretrained(self) -> None:
        """The pretrained DDPM UNet's weights (`model.backbone`), frozen inside the model."""
        from latentseg.models.backbone import load_backbone

        self.features.unet.load_state_dict(load_backbone(self.config.backbone).state_dict())

    def segmentation_losses(self, batch, gamma: float, generator: torch.Generator | None = None) -> Losses:
        """CE + gamma * Dice of the head (the backbone and text encoder are frozen); no diffusion loss."""
        logits = self.logits(batch["image"], batch.get("text"), generator)
        segmentation = dice_ce(logits, batch["label"], gamma, self.dice).mean()
        return Losses(segmentation, segmentation, torch.zeros((), device=logits.device))

    # --- sampling ---------------------------------------------------------------------------

    def sampling_problems(self, options: SampleConfig) -> list[str]:
        if options.sampler != "ddim":
            return ["a textdiff model has no staged sampler; it runs its backbone once per feature timestep"]
        return []

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        options: SampleConfig,
        text: TextEmbedding | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(num_samples, B, C, H, W) probabilities, each from its own noise draws (the steps of the
        diffusion models do not apply: the backbone runs once per feature timestep)."""
        problems = self.sampling_problems(options)
        if problems:
            raise ValueError(problems[0])
        count = concrete_sampling(options).num_samples
        return torch.stack([self.logits(image, text, generator).softmax(1) for _ in range(count)])


class HeadObjective:
    """TextDiff's objective: the segmentation loss of the trained head alone."""

    def __init__(self, model: TextDiffSegmenter, gamma: float):
        self.model, self.gamma = model, gamma

    def losses(self, batch, phases: tuple[str, ...] = ()) -> Losses:
        return self.model.segmentation_losses(batch, self.gamma)

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""


def plan(config: Config) -> None:
    """Before the data: the pretrained DDPM UNet of `model.backbone` is read and its diffusers
    config recorded (`backbone_config`), and the feature blocks and timesteps checked against it."""
    from latentseg.errors import LatentSegError
    from latentseg.models.backbone import check_feature_settings, load_backbone

    m = config.model
    if config.train.timesteps != "uniform":
        raise LatentSegError(
            "train.timesteps: model.mode=textdiff trains no diffusion (its feature timesteps are fixed)"
        )
    if m.backbone_config:  # already planned (a resumed run)
        return
    if not m.backbone:
        raise LatentSegError("model.mode=textdiff needs model.backbone=FOLDER, a diffusers UNet2DModel (pretrain-ddpm)")
    unet = load_backbone(m.backbone)
    check_feature_settings(unet, m.feature_blocks, m.feature_timesteps, m.num_timesteps)
    m.backbone_config = dict(unet.config)


def data_problems(config: ModelConfig) -> list[str]:
    """After the data: the backbone must take the data's images."""
    if config.spatial_dims != 2:
        return [f"model.mode=textdiff needs 2D images; the data is {config.spatial_dims}D"]
    channels = config.backbone_config.get("in_channels")
    if channels != config.in_channels:
        return [f"{config.backbone}: the UNet takes {channels} image channels, the data has {config.in_channels}"]
    return []
