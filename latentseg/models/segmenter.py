"""LDSeg (003): label encoder, image encoder, conditional denoiser and label decoder, trained end
to end (Algorithm 1) and sampled in the latent space (Algorithm 2, with DDIM)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from latentseg.config import ModelConfig
from latentseg.diffusion import (
    PREDICTION_TYPES,
    DiffusionSchedule,
    make_sampler,
    randn,
    sample_loop,
    uniform_timesteps,
)
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import ImageEncoder, LabelDecoder, LabelEncoder, standardize


class Losses(NamedTuple):
    total: torch.Tensor
    segmentation: torch.Tensor  # CE + gamma * Dice, 003 Eq. 16
    diffusion: torch.Tensor  # ||target - f_denoiser||^2, 003 Eq. 17


def repeat_samples(cond: dict, num_samples: int) -> dict:
    """Every conditioning tensor (or list of tensors) repeated for N samples: (B, ...) -> (N*B, ...)."""

    def rep(v: torch.Tensor) -> torch.Tensor:
        return v.repeat(num_samples, *([1] * (v.ndim - 1)))

    return {k: [rep(x) for x in v] if isinstance(v, list) else rep(v) for k, v in cond.items()}


def check_model_config(config: ModelConfig) -> None:
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}")
    if config.x0_estimate not in ("exact", "paper"):
        raise ValueError(f"x0_estimate must be 'exact' or 'paper', got {config.x0_estimate!r}")
    if config.x0_estimate == "paper" and config.prediction_type != "eps":
        raise ValueError("x0_estimate='paper' (z_t - eps_hat, 003 Eq. 12) needs prediction_type='eps'")
    if config.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")


class LatentSegmenter(nn.Module):
    """The LDSeg model for any `spatial_dims`.

    Args:
        config: network widths, strides and the diffusion settings.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_model_config(config)
        self.config = config
        c = config
        strides = c.strides or [2] * c.num_downsamplings  # `train` plans per-axis strides from the data
        self.schedule = DiffusionSchedule(c.schedule, c.num_timesteps)
        self.image_encoder = ImageEncoder(
            c.spatial_dims,
            c.in_channels,
            c.image_latent_channels,
            c.image_encoder_channels,
            strides,
            c.attention_stages,
            c.num_heads,
        )
        self.label_encoder = LabelEncoder(
            c.spatial_dims, c.num_classes, c.latent_channels, c.label_encoder_channels, strides
        )
        self.denoiser = Denoiser(
            c.spatial_dims,
            c.latent_channels,
            c.image_latent_channels,
            c.denoiser_channels,
            c.denoiser_strides or None,
            num_heads=c.num_heads,
        )
        skips = [c.in_channels, *c.image_encoder_channels[1:-1]] if c.decoder_skips else None
        self.label_decoder = LabelDecoder(
            c.spatial_dims, c.latent_channels, c.num_classes, c.decoder_channels, strides, skips
        )
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, lambda_dice=1.0)

    def conditioning(self, image: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Everything the networks are conditioned on, in one dict: z_image (003 Eq. 9) for the
        denoiser and, with `decoder_skips`, the image features for the decoder."""
        if not self.config.decoder_skips:
            return {"z_image": self.image_encoder(image)}
        z_image, features = self.image_encoder.forward_features(image)
        return {"z_image": z_image, "image_features": features}

    def decode(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """Class logits of a clean latent (003 Eq. 13)."""
        return self.label_decoder(z, cond.get("image_features"))

    def encode_label(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, *S) integer labels -> standardized z_label (003 Eq. 10)."""
        onehot = F.one_hot(label[:, 0].long(), self.config.num_classes)  # (B, *S, C)
        return self.label_encoder(onehot.movedim(-1, 1).float())

    def estimate_x0(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent to decode: exact inversion of Eq. 11, or 003 Eq. 12 as printed."""
        if self.config.x0_estimate == "paper":
            return z_t - model_output  # 003 Eq. 12: z_dn = z_t - f_denoiser(z_t, z_i, t)
        return self.schedule.split(self.config.prediction_type, model_output, z_t, t)[0]

    def training_losses(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        gamma: float = 2.0,
        lam: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Losses:
        """003 Algorithm 1, one batch: L = CE + gamma * Dice + lambda * ||target - output||^2 (Eq. 18)."""
        cond = self.conditioning(image)  # line 3
        z0 = self.encode_label(label)  # line 4
        t = uniform_timesteps(z0.shape[0], self.schedule.num_timesteps, z0.device, generator)  # line 5
        noise = randn(z0.shape, generator, z0)  # line 6
        z_t = self.schedule.q_sample(z0, t, noise)  # line 7, Eq. 11
        out = self.denoiser(z_t, t, cond)
        logits = self.decode(self.estimate_x0(out, z_t, t), cond)  # lines 8-9, Eq. 12-13
        self.seg_loss.lambda_dice = gamma
        seg = self.seg_loss(logits, label)  # Eq. 14-16
        diff = F.mse_loss(out, self.schedule.target(self.config.prediction_type, z0, t, noise))  # Eq. 17
        return Losses(seg + lam * diff, seg, diff)  # Eq. 18

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        num_samples: int = 1,
        steps: int | None = 2,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """003 Algorithm 2 with DDIM: class probabilities of `num_samples` samples per image.

        The image encoder runs once per image; all samples go through the denoiser and the
        decoder in one batch. `steps=None` runs the full 1000-step DDPM chain.

        Returns:
            (num_samples, B, C, *S) softmax probabilities.
        """
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond = self.conditioning(image)
        batch = image.shape[0]
        cond = repeat_samples(cond, num_samples)  # (N*B, ...)
        latent_shape = (num_samples * batch, self.config.latent_channels, *cond["z_image"].shape[2:])
        z_T = randn(latent_shape, generator, image)  # line 1
        sampler = make_sampler(self.schedule, self.config.prediction_type, steps, eta)
        z0 = sample_loop(
            lambda z, t: self.denoiser(z, t, cond),
            z_T,
            sampler,
            generator,
            post_step=standardize if self.config.restandardize else None,
            final_x0=self.estimate_x0 if self.config.x0_estimate == "paper" else None,
        )
        probs = torch.softmax(self.decode(z0, cond), dim=1)  # line 7
        return probs.reshape(num_samples, batch, *probs.shape[1:])
