"""LDSeg (003): label encoder, image encoder, conditional denoiser and label decoder, trained end
to end (Algorithm 1) and sampled in the latent space (Algorithm 2, with DDIM)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from latentseg.config import ModelConfig
from latentseg.diffusion import (
    PREDICTION_TYPES,
    DiffusionSchedule,
    ImportanceTimesteps,
    Stages,
    make_sampler,
    randn,
    sample_loop,
    staged_sample,
    staged_timesteps,
    uniform_timesteps,
)
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import DownsampleEncoder, ImageEncoder, LabelDecoder, LabelEncoder, standardize
from latentseg.models.text_fusion import TEXT_FUSIONS, make_text_fusion
from latentseg.text import TextEmbedding


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
    if config.mode == "textdiff":
        from latentseg.models.textdiff import check_textdiff_config

        return check_textdiff_config(config)
    if config.mode != "ldseg":
        raise ValueError(f"mode must be ldseg or textdiff, got {config.mode!r}")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}")
    if config.x0_estimate not in ("exact", "paper"):
        raise ValueError(f"x0_estimate must be 'exact' or 'paper', got {config.x0_estimate!r}")
    if config.x0_estimate == "paper" and config.prediction_type != "eps":
        raise ValueError("x0_estimate='paper' (z_t - eps_hat, 003 Eq. 12) needs prediction_type='eps'")
    if config.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
    if config.denoiser_heads not in (1, 2):
        raise ValueError(f"denoiser_heads must be 1 or 2 (eps and x0), got {config.denoiser_heads}")
    if config.denoiser_heads == 2 and config.prediction_type == "v":
        raise ValueError("a two-head denoiser predicts eps and x0; prediction_type picks the head, 'eps' or 'x0'")
    Stages(config.stage_high, config.stage_low, config.num_timesteps)
    if config.text_fusion not in TEXT_FUSIONS:
        raise ValueError(f"text_fusion must be one of {', '.join(TEXT_FUSIONS)}, got {config.text_fusion!r}")
    if config.text_fusion != "none" and config.text_dim < 1:
        raise ValueError("a text model needs text_dim (set by `train` from the text encoder)")
    if config.prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {config.prompt!r}")
    if config.prompt != "none" and config.text_fusion == "none":
        raise ValueError("a prompted model needs text_fusion=attention or concat (how the prompt joins the image)")
    if config.condition not in ("learned", "pretrained"):
        raise ValueError(f"condition must be 'learned' or 'pretrained', got {config.condition!r}")
    if config.label_autoencoder not in ("joint", "pretrained"):
        raise ValueError(f"label_autoencoder must be 'joint' or 'pretrained', got {config.label_autoencoder!r}")
    if config.label_autoencoder == "pretrained" and config.decoder_skips:
        raise ValueError("label_autoencoder=pretrained decodes the mask latent alone; it cannot use decoder_skips")
    for name in ("image_encoder", "label_encoder"):
        if getattr(config, name) not in ENCODERS:
            raise ValueError(f"{name} must be one of {', '.join(ENCODERS)}, got {getattr(config, name)!r}")
    if config.image_encoder == "downsample" and (config.decoder_skips or config.condition == "pretrained"):
        raise ValueError(
            "image_encoder=downsample has no features at finer resolutions: it cannot be used with "
            "decoder_skips or condition=pretrained"
        )
    if config.text_in_denoiser and config.text_fusion != "attention":
        raise ValueError("text_in_denoiser adds cross-attention to the text tokens: it needs text_fusion=attention")


PROMPTS = ("none", "class", "text")
ENCODERS = ("learned", "downsample")  # 000 Table II: a network, or plain downsampling (zeta_2, zeta_3)
PRETRAIN_PARTS = ("condition", "autoencoder")
TIMESTEP_RULES = ("uniform", "staged", "importance")


class ClassPrompts(nn.Module):
    """002's learned class embedding: one vector per target name, given to the text fusion as a
    one-token sentence."""

    def __init__(self, names: list[str], dim: int):
        super().__init__()
        if not names:
            raise ValueError("a class-prompt model needs its target names (prompt_names, set by `train`)")
        self.embedding = nn.Embedding(len(names), dim)

    def forward(self, ids: torch.Tensor) -> TextEmbedding:
        e = self.embedding(ids)  # (B, D)
        return TextEmbedding(e[:, None], torch.zeros(len(ids), 1, dtype=torch.bool, device=e.device), e)


def dice_ce(logits: torch.Tensor, label: torch.Tensor, gamma: float, dice: DiceLoss) -> torch.Tensor:
    """(B,) CE + gamma * Dice per image (003 Eq. 14-16); the batch mean is MONAI's DiceCELoss.

    `dice`: DiceLoss(to_onehot_y=True, softmax=True, reduction="none").
    """
    ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none").flatten(1).mean(1)
    return ce + gamma * dice(logits, label).flatten(1).mean(1)


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
        if c.image_encoder == "downsample":
            self.image_encoder = DownsampleEncoder(
                c.spatial_dims, c.in_channels, c.image_latent_channels, strides, standardized=False
            )
        else:
            self.image_encoder = ImageEncoder(
                c.spatial_dims,
                c.in_channels,
                c.image_latent_channels,
                c.image_encoder_channels,
                strides,
                c.attention_stages,
                c.num_heads,
            )
        if c.label_encoder == "downsample":
            self.label_encoder = DownsampleEncoder(
                c.spatial_dims, c.num_classes, c.latent_channels, strides, standardized=True
            )
        else:
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
            heads=c.denoiser_heads,
            condition_attention=c.condition == "pretrained",
            text_dim=c.text_dim if c.text_in_denoiser else 0,
        )
        image_side = [c.in_channels, *c.image_encoder_channels[1:-1]]
        skips = image_side if c.decoder_skips else None
        if c.condition == "pretrained":  # CFENet = image encoder + this decoder, trained to segment
            head_skips = image_side if c.condition_head_skips else None
            self.condition_head = LabelDecoder(
                c.spatial_dims, c.image_latent_channels, c.num_classes, c.decoder_channels, strides, head_skips
            )
        self.label_decoder = LabelDecoder(
            c.spatial_dims, c.latent_channels, c.num_classes, c.decoder_channels, strides, skips
        )
        self.text_fusion = make_text_fusion(c)
        self.class_prompts = ClassPrompts(c.prompt_names, c.text_dim) if c.prompt == "class" else None
        self.stages = Stages(c.stage_high, c.stage_low, c.num_timesteps)
        # the single-output path (DDIM/DDPM) uses the head that predicts `prediction_type`
        self.head = 1 if c.denoiser_heads == 2 and c.prediction_type == "x0" else 0
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def conditioning(
        self, image: torch.Tensor, text: TextEmbedding | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Everything the networks are conditioned on, in one dict: z_image (003 Eq. 9; fused with
        the text, 000 Eq. 2, for text models) for the denoiser and, with `decoder_skips`, the image
        features for the decoder."""
        if self.config.decoder_skips:
            z_image, features = self.image_encoder.forward_features(image)
            cond = {"z_image": z_image, "image_features": features}
        else:
            cond = {"z_image": self.image_encoder(image)}
        if isinstance(text, torch.Tensor):  # class ids of a class-prompt model
            if self.class_prompts is None:
                raise ValueError("class ids were given to a model without class prompts")
            text = self.class_prompts(text)
        if self.text_fusion is not None:
            if text is None:
                raise ValueError("this model was trained with text: give each image a description or a prompt")
            cond["z_image"] = self.text_fusion(cond["z_image"], text)
            if self.config.text_in_denoiser:
                cond["text_tokens"], cond["text_padding"] = text.tokens, text.padding
        elif text is not None:
            raise ValueError("this model was trained without text (model.text_fusion=none): it cannot take a prompt")
        return cond

    @property
    def pretrain_parts(self) -> tuple[str, ...]:
        """The parts trained, then frozen, before the diffusion: the condition network (004 section
        2.3) and the mask autoencoder (002 section 2.1)."""
        c = self.config
        chosen = {"condition": c.condition, "autoencoder": c.label_autoencoder}
        return tuple(p for p in PRETRAIN_PARTS if chosen[p] == "pretrained")

    def pretrain_losses(
        self, image: torch.Tensor, label: torch.Tensor, parts: tuple[str, ...], gamma: float = 2.0, lam: float = 1e-5
    ) -> Losses:
        """The summed pre-training losses of `parts` (see `condition_losses`, `autoencoder_losses`)."""
        losses = [
            self.condition_losses(image, label, gamma) if p == "condition" else self.autoencoder_losses(label, lam)
            for p in parts
        ]
        return Losses(*(sum(terms) for terms in zip(*losses, strict=True)))

    def condition_losses(self, image: torch.Tensor, label: torch.Tensor, gamma: float = 2.0) -> Losses:
        """Pre-training of the condition network (004 section 2.3): CE + gamma * Dice of CFENet's own
        segmentation."""
        z_image, features = self.image_encoder.forward_features(image)
        features = features if self.config.condition_head_skips else None
        seg = self.segmentation_loss(self.condition_head(z_image, features), label, gamma).mean()
        return Losses(seg, seg, torch.zeros((), device=seg.device))

    def autoencoder_losses(self, label: torch.Tensor, lam: float = 1e-5) -> Losses:
        """The mask autoencoder alone (002 Eq. 3): L_AE = L_BCE + L_DICE + lam * ||w||^2. BCE (Eq. 1)
        is the cross-entropy of the softmax over classes (the same for two classes), Dice is Eq. 2,
        and w are the label encoder's and decoder's weights."""
        logits = self.label_decoder(self.encode_label(label))
        reconstruction = self.segmentation_loss(logits, label, 1.0).mean()  # Eq. 1 + Eq. 2
        weights = [p for m in (self.label_encoder, self.label_decoder) for p in m.parameters() if p.ndim > 1]
        decay = lam * sum(w.pow(2).sum() for w in weights)  # Eq. 3's regulariser
        return Losses(reconstruction + decay, reconstruction, torch.zeros((), device=logits.device))

    def freeze(self, part: str) -> None:
        """Freeze a pre-trained part for the diffusion training that follows."""
        if part not in self.pretrain_parts:
            raise ValueError(f"{part!r} is not a pre-trained part of this model ({', '.join(self.pretrain_parts)})")
        names = {"condition": ("image_encoder", "condition_head"), "autoencoder": ("label_encoder", "label_decoder")}
        for module in (getattr(self, name) for name in names[part]):
            module.requires_grad_(False)

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

    def segmentation_loss(self, logits: torch.Tensor, label: torch.Tensor, gamma: float) -> torch.Tensor:
        return dice_ce(logits, label, gamma, self.dice)

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
        importance: ImportanceTimesteps | None = None,
    ) -> Losses:
        """003 Algorithm 1, one batch: L = CE + gamma * Dice + lambda * ||target - output||^2 (Eq. 18).

        `timesteps="staged"` moves t and weights the two terms per stage (004 section 2.2, Eq. 1):
        L = lambda * alpha * L_noise + beta * (CE + gamma * Dice). With two heads, L_noise is the eps
        head's error plus the x0 head's latent error, and the x0 head's latent is the one decoded.
        `timesteps="importance"` draws t from `importance` (002 section 3.1), weights each sample's
        loss by 1 / (T p(t)) and tells `importance` the unweighted losses.
        With a pre-trained (frozen) mask autoencoder, the loss is the diffusion term alone (002:
        MSE on the latent), and nothing is decoded.
        """
        if timesteps not in TIMESTEP_RULES:
            raise ValueError(f"timesteps must be one of {', '.join(TIMESTEP_RULES)}, got {timesteps!r}")
        if (timesteps == "importance") != (importance is not None):
            raise ValueError("timesteps='importance' needs an ImportanceTimesteps, and only it takes one")
        cond = self.conditioning(image, text)  # line 3
        z0 = self.encode_label(label)  # line 4
        weight = alpha = beta = torch.ones(z0.shape[0], device=z0.device)
        if importance is not None:
            t, weight = importance.sample(z0.shape[0], z0.device, generator)
        else:
            t = uniform_timesteps(z0.shape[0], self.schedule.num_timesteps, z0.device, generator)  # line 5
        if timesteps == "staged":
            t, alpha, beta = staged_timesteps(t, self.stages, last_stage_t)
        noise = randn(z0.shape, generator, z0)  # line 6
        z_t = self.schedule.q_sample(z0, t, noise)  # line 7, Eq. 11

        def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a - b).pow(2).flatten(1).mean(1)

        if self.config.denoiser_heads == 2:
            eps_hat, x0_hat = self.denoiser.forward_heads(z_t, t, cond)
            diff = mse(eps_hat, noise) + mse(x0_hat, z0)
            z_dn = x0_hat
        else:
            out = self.denoiser(z_t, t, cond)
            diff = mse(out, self.schedule.target(self.config.prediction_type, z0, t, noise))  # Eq. 17
            z_dn = self.estimate_x0(out, z_t, t)  # lines 8-9, Eq. 12
        if self.config.label_autoencoder == "pretrained":
            seg = torch.zeros_like(diff)  # the decoder is frozen: 002 trains on the latent alone
        else:
            seg = self.segmentation_loss(self.decode(z_dn, cond), label, gamma)  # Eq. 13-16
            if self.config.denoiser_heads == 2 and self.config.eps_head_seg_loss:
                z_eps = self.schedule.split("eps", eps_hat, z_t, t)[0]
                used = (t <= self.stages.high).float()  # above it, sampling takes the x0 head
                seg = seg + used * self.segmentation_loss(self.decode(z_eps, cond), label, gamma)
        per_sample = beta * seg + lam * alpha * diff  # Eq. 18; 004 Eq. 1 when staged
        if importance is not None:
            importance.update(t, per_sample)
        return Losses((weight * per_sample).mean(), seg.mean(), diff.mean())

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        num_samples: int = 1,
        steps: int | None = 2,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
        middle_steps: int = 10,
        text: TextEmbedding | None = None,
        final_head: str = "eps",
    ) -> torch.Tensor:
        """003 Algorithm 2 with DDIM: class probabilities of `num_samples` samples per image.

        The image encoder runs once per image; all samples go through the denoiser and the
        decoder in one batch. `steps=None` runs the full 1000-step DDPM chain. `sampler="staged"`
        is 004's staged inference (two-head models): num_samples / 2 draws per branch.

        Returns:
            (num_samples, B, C, *S) softmax probabilities.
        """
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in ("ddim", "staged"):
            raise ValueError(f"sampler must be 'ddim' or 'staged', got {sampler!r}")
        cond = self.conditioning(image, text)
        batch = image.shape[0]
        if sampler == "staged":
            return self._sample_staged(cond, batch, num_samples, middle_steps, generator, image, final_head)
        cond = repeat_samples(cond, num_samples)  # (N*B, ...)
        latent_shape = (num_samples * batch, self.config.latent_channels, *cond["z_image"].shape[2:])
        z_T = randn(latent_shape, generator, image)  # line 1
        sampler = make_sampler(self.schedule, self.config.prediction_type, steps, eta)
        z0 = sample_loop(
            lambda z, t: self.denoiser(z, t, cond, head=self.head),
            z_T,
            sampler,
            generator,
            post_step=standardize if self.config.restandardize else None,
            final_x0=self.estimate_x0 if self.config.x0_estimate == "paper" else None,
        )
        probs = torch.softmax(self.decode(z0, cond), dim=1)  # line 7
        return probs.reshape(num_samples, batch, *probs.shape[1:])

    def _sample_staged(
        self,
        cond: dict,
        batch: int,
        num_samples: int,
        middle_steps: int,
        generator: torch.Generator | None,
        like: torch.Tensor,
        final_head: str = "eps",
    ) -> torch.Tensor:
        if self.config.denoiser_heads != 2:
            raise ValueError("staged sampling needs a model trained with model.denoiser_heads=2 (eps and x0 heads)")
        if num_samples < 2 or num_samples % 2:
            raise ValueError(
                f"staged sampling draws the same number from both heads: samples must be even, got {num_samples}"
            )

        def heads_fn(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps_hat, x0_hat = self.denoiser.forward_heads(z, t, repeat_samples(cond, z.shape[0] // batch))
            return eps_hat, x0_hat

        latent_shape = (batch, self.config.latent_channels, *cond["z_image"].shape[2:])
        z_T = randn(latent_shape, generator, like)
        result = staged_sample(
            heads_fn, z_T, self.schedule, self.stages, middle_steps, num_samples // 2, 1.0, generator, final_head
        )
        probs = torch.softmax(self.decode(result.samples, repeat_samples(cond, num_samples)), dim=1)
        return probs.reshape(num_samples, batch, *probs.shape[1:])
