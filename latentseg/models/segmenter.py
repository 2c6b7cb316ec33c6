"""LDSeg (003): label encoder, image encoder, conditional denoiser and label decoder, trained end
to end (Algorithm 1, `latentseg.models.objective`) and sampled in the latent space (Algorithm 2,
with the sampler `SampleConfig.sampler` names). The options of 000, 002 and 004 are composed in:
text fusion, class prompts, a two-head denoiser, a pre-trained condition network or mask
autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentseg.config import Config, ModelConfig, SampleConfig, TrainConfig, concrete_sampling
from latentseg.diffusion import ChainSampler, DiffusionSchedule, LatentSampler, StagedSampler, Stages
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import DownsampleEncoder, ImageEncoder, LabelDecoder, LabelEncoder, standardize
from latentseg.models.heads import OneHead, TwoHeads
from latentseg.models.losses import Losses, dice_ce, soft_dice_loss
from latentseg.models.objective import LatentDiffusionObjective, Phase, timestep_rule
from latentseg.models.text_fusion import make_text_fusion
from latentseg.schema import problems as schema_problems
from latentseg.text import TextEmbedding


def repeat_samples(cond: dict, num_samples: int) -> dict:
    """Every conditioning tensor (or list of tensors) repeated for N samples: (B, ...) -> (N*B, ...);
    for one sample the same tensors, not copies."""
    if num_samples == 1:
        return dict(cond)

    def rep(v: torch.Tensor) -> torch.Tensor:
        return v.repeat(num_samples, *([1] * (v.ndim - 1)))

    return {k: [rep(x) for x in v] if isinstance(v, list) else rep(v) for k, v in cond.items()}


def ldseg_problems(config: ModelConfig) -> list[str]:
    """What is wrong with an LDSeg config: each setting's type and range, and what cannot combine."""
    c, found = config, schema_problems(config)
    if c.x0_estimate == "paper" and c.prediction_type != "eps":
        found.append("x0_estimate='paper' (z_t - eps_hat, 003 Eq. 12) needs prediction_type='eps'")
    if c.denoiser_heads == 2 and c.prediction_type == "v":
        found.append("a two-head denoiser predicts eps and x0; prediction_type picks the head, 'eps' or 'x0'")
    if not 0 < c.stage_low < c.stage_high < c.num_timesteps:
        found.append(
            f"staged thresholds must satisfy 0 < low < high < T={c.num_timesteps}, "
            f"got high={c.stage_high}, low={c.stage_low}"
        )
    if c.text_fusion != "none" and c.text_dim < 1:
        found.append("a text model needs text_dim (set by `train` from the text encoder)")
    if c.prompt != "none" and c.text_fusion == "none":
        found.append("a prompted model needs text_fusion=attention or concat (how the prompt joins the image)")
    if c.label_autoencoder == "pretrained" and c.decoder_skips is True:
        found.append("label_autoencoder=pretrained decodes the mask latent alone; it cannot use decoder_skips")
    if c.diffusion_trains_label_encoder is False and c.latent_reconstruction is False:
        found.append(
            "diffusion_trains_label_encoder=false leaves the label encoder to latent_reconstruction: turn it on"
        )
    if c.image_encoder == "downsample" and (c.decoder_skips is True or c.condition == "pretrained"):
        found.append(
            "image_encoder=downsample has no features at finer resolutions: it cannot be used with "
            "decoder_skips or condition=pretrained"
        )
    if c.text_in_denoiser and c.text_fusion != "attention":
        found.append("text_in_denoiser adds cross-attention to the text tokens: it needs text_fusion=attention")
    return found


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
        padding = torch.zeros_like(ids, dtype=torch.bool)[:, None]  # (B, 1); from ids' shape, so it traces
        return TextEmbedding(e[:, None], padding, e)


ENCODER_KINDS = ("learned", "downsample")  # 000 Table II: a network, or plain downsampling (zeta_2, zeta_3)


def _image_encoder(c: ModelConfig, strides: list) -> nn.Module:
    if c.image_encoder == "downsample":
        return DownsampleEncoder(c.spatial_dims, c.in_channels, c.image_latent_channels, strides, standardized=False)
    return ImageEncoder(
        c.spatial_dims,
        c.in_channels,
        c.image_latent_channels,
        c.image_encoder_channels,
        strides,
        c.attention_stages,
        c.num_heads,
    )


def _label_encoder(c: ModelConfig, strides: list) -> nn.Module:
    if c.label_encoder == "downsample":
        return DownsampleEncoder(c.spatial_dims, c.num_classes, c.latent_channels, strides, standardized=True)
    return LabelEncoder(c.spatial_dims, c.num_classes, c.latent_channels, c.label_encoder_channels, strides)


def _denoiser(c: ModelConfig) -> Denoiser:
    return Denoiser(
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


def sampling_parts(c: ModelConfig) -> tuple[DiffusionSchedule, Stages, OneHead | TwoHeads]:
    """The schedule, the staged thresholds and the heads' maths a model samples with."""
    schedule = DiffusionSchedule(c.schedule, c.num_timesteps)
    heads = TwoHeads(schedule, c.eps_head_seg_loss, c.stage_high) if c.denoiser_heads == 2 else (
        OneHead(schedule, c.prediction_type, c.x0_estimate)
    )  # fmt: skip
    return schedule, Stages(c.stage_high, c.stage_low, c.num_timesteps), heads


def decode_batch(options: SampleConfig, z0: torch.Tensor, num_samples: int) -> int:
    """How many samples the decoder takes at once: `options.decode_batch`, or for "auto" one for 2D
    images on a CPU (four 256^2 samples 14% faster so: benchmarks/results/inference.json,
    decode_batch_2d_256), all together in 3D (as fast or faster at 96^3) and on a GPU."""
    if options.decode_batch != "auto":
        return min(options.decode_batch, num_samples)
    return 1 if z0.device.type == "cpu" and z0.ndim == 4 else num_samples


class LatentSampling:
    """003 Algorithm 2 over three parts a model provides: `conditioning(image, text)`,
    `denoiser.forward_heads(z_t, t, cond, heads)` and `decode(z_0, cond)` (torch modules here,
    ONNX Runtime sessions in `latentseg.onnx_engine`), with `config`, `schedule`, `heads` and
    `stages` for the samplers."""

    def latent_sampler(self, options: SampleConfig) -> LatentSampler:
        """The sampler `options.sampler` names, for this model's heads."""
        return SAMPLERS[options.sampler](self, options)

    def sampling_problems(self, options: SampleConfig) -> list[str]:
        return self.latent_sampler(options).problems(concrete_sampling(options).num_samples, self.heads.names)

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        options: SampleConfig,
        text: TextEmbedding | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """003 Algorithm 2: class probabilities of `options.num_samples` samples per image.

        The image encoder runs once per image; all samples go through the denoiser and the
        decoder in one batch. `options.steps=None` runs the full 1000-step DDPM chain.

        Returns:
            (num_samples, B, C, *S) softmax probabilities.
        """
        options = concrete_sampling(options)
        sampler = self.latent_sampler(options)
        problems = sampler.problems(options.num_samples, self.heads.names)
        if problems:
            raise ValueError(problems[0])
        cond = self.conditioning(image, text)
        batch, n = image.shape[0], options.num_samples
        shape = (batch, self.config.latent_channels, *cond["z_image"].shape[2:])
        z0 = sampler.sample(self._denoiser_fn(cond, batch), shape, n, generator, image)
        probs = torch.softmax(self.decode_samples(z0, cond, batch, decode_batch(options, z0, n)), dim=1)  # line 7
        return probs.reshape(n, batch, *probs.shape[1:])

    def decode_samples(self, z0: torch.Tensor, cond: dict, batch: int, per_pass: int) -> torch.Tensor:
        """Class logits of (N*B, ...) sampled latents of B images, sample-major as the samplers give
        them, decoded `per_pass` samples at a time (the conditioning repeated once per pass size)."""
        repeated: dict[int, dict] = {}
        logits = []
        for start in range(0, z0.shape[0], per_pass * batch):
            z = z0[start : start + per_pass * batch]
            k = z.shape[0] // batch
            if k not in repeated:
                repeated[k] = repeat_samples(cond, k)
            logits.append(self.decode(z, repeated[k]))
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _denoiser_fn(self, cond: dict, batch: int):
        """denoise(z, t, heads) -> {head: output}, the conditioning repeated to z's batch."""
        repeated: dict[int, dict] = {}
        index = {name: i for i, name in enumerate(self.heads.names)}

        def denoise(z: torch.Tensor, t: torch.Tensor, heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
            n = z.shape[0] // batch
            if n not in repeated:
                repeated[n] = repeat_samples(cond, n)
            outputs = self.denoiser.forward_heads(z, t, repeated[n], [index[h] for h in heads])
            return dict(zip(heads, outputs, strict=True))

        return denoise


class LatentSegmenter(LatentSampling, nn.Module):
    """The LDSeg model for any `spatial_dims`.

    Args:
        config: network widths, strides and the diffusion settings (planned, see `latentseg.plan`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        problems = ldseg_problems(config)
        if problems:
            raise ValueError("; ".join(problems))
        self.config = c = config
        # `resolve` plans per-axis strides from the data; unplanned, 003's four halvings
        strides = c.strides or [2] * (c.num_downsamplings if isinstance(c.num_downsamplings, int) else 4)
        self.schedule, self.stages, self.heads = sampling_parts(c)
        self.image_encoder = _image_encoder(c, strides)
        self.label_encoder = _label_encoder(c, strides)
        self.denoiser = _denoiser(c)
        image_side = [c.in_channels, *c.image_encoder_channels[1:-1]]
        if c.condition == "pretrained":  # CFENet = image encoder + this decoder, trained to segment
            head_skips = image_side if c.condition_head_skips else None
            self.condition_head = LabelDecoder(
                c.spatial_dims, c.image_latent_channels, c.num_classes, c.decoder_channels, strides, head_skips
            )
        self.skips = c.decoder_skips is True  # "auto" is planned; unplanned it means none
        self.image_latent_to_decoder = self.skips and c.decoder_image_latent is True
        skips = image_side if self.skips else None
        decoder_in = c.latent_channels + (c.image_latent_channels if self.image_latent_to_decoder else 0)
        full = c.decoder_full_skip is not False  # "auto" unplanned: as models were saved before it was planned
        fuse_kernel = 3 if c.decoder_fuse_kernel == "auto" else c.decoder_fuse_kernel  # unplanned: as saved before
        self.label_decoder = LabelDecoder(
            c.spatial_dims, decoder_in, c.num_classes, c.decoder_channels, strides, skips, full, fuse_kernel
        )
        self.text_fusion = make_text_fusion(c)
        self.class_prompts = ClassPrompts(c.prompt_names, c.text_dim) if c.prompt == "class" else None
        self.decodes_in_training = c.label_autoencoder != "pretrained"  # 002 trains on the latent alone
        # "auto" unplanned (models saved before it existed): off
        self.reconstructs_latent = c.latent_reconstruction is True
        self.diffusion_trains_label_encoder = c.diffusion_trains_label_encoder is not False  # auto unplanned: 003
        self.dice = soft_dice_loss()

    # --- networks -------------------------------------------------------------------------

    def conditioning(
        self, image: torch.Tensor, text: TextEmbedding | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Everything the networks are conditioned on, in one dict: z_image (003 Eq. 9; fused with
        the text, 000 Eq. 2, for text models) for the denoiser and, with `decoder_skips`, the image
        features for the decoder."""
        if self.skips:
            z_image, features = self.image_encoder.forward_features(image)
            cond = {"z_image": z_image, "image_features": features}
        else:
            cond = {"z_image": self.image_encoder(image)}
        text = self._text(text)
        if self.text_fusion is not None:
            cond["z_image"] = self.text_fusion(cond["z_image"], text)
            if self.config.text_in_denoiser:
                cond["text_tokens"], cond["text_padding"] = text.tokens, text.padding
        return cond

    def _text(self, text: TextEmbedding | torch.Tensor | None) -> TextEmbedding | None:
        """Class ids become their learned embeddings; text is required exactly by text models."""
        if isinstance(text, torch.Tensor):  # class ids of a class-prompt model
            if self.class_prompts is None:
                raise ValueError("class ids were given to a model without class prompts")
            text = self.class_prompts(text)
        if self.text_fusion is not None and text is None:
            raise ValueError("this model was trained with text: give each image a description or a prompt")
        if self.text_fusion is None and text is not None:
            raise ValueError("this model was trained without text (model.text_fusion=none): it cannot take a prompt")
        return text

    def denoise_all(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """Every head's output from one pass of the shared encoder: {head name: output}."""
        return dict(zip(self.heads.names, self.denoiser.forward_heads(z_t, t, cond), strict=True))

    def decode(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """Class logits of a clean latent (003 Eq. 13)."""
        if self.image_latent_to_decoder:
            z = torch.cat([z, cond["z_image"]], dim=1)
        return self.label_decoder(z, cond.get("image_features"))

    def decode_latent_alone(self, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """Class logits of a label latent with the image side (skips, z_image) zeroed: what the latent
        itself holds."""
        return self.decode(z, {k: [torch.zeros_like(x) for x in v] if isinstance(v, list) else torch.zeros_like(v)
                               for k, v in cond.items()})  # fmt: skip

    def encode_label(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, *S) integer labels -> standardized z_label (003 Eq. 10)."""
        onehot = F.one_hot(label[:, 0].long(), self.config.num_classes)  # (B, *S, C)
        return self.label_encoder(onehot.movedim(-1, 1).float())

    def estimate_x0(self, model_output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent of a one-head output: exact inversion of Eq. 11, or 003 Eq. 12 as printed."""
        return self.heads.estimate_x0(model_output, z_t, t)

    def segmentation_loss(self, logits: torch.Tensor, label: torch.Tensor, gamma: float) -> torch.Tensor:
        return dice_ce(logits, label, gamma, self.dice)

    # --- training ---------------------------------------------------------------------------

    def objective(self, config: Config) -> LatentDiffusionObjective:
        return LatentDiffusionObjective(self, timestep_rule(config), config)

    def phases(self, train: TrainConfig) -> list[Phase]:
        """The parts trained, then frozen, before the diffusion: the condition network (004 section
        2.3) and the mask autoencoder (002 section 2.1)."""
        c, found = self.config, []
        if c.condition == "pretrained":
            found.append(Phase("condition", train.condition_pretrain_fraction, "condition network"))
        if c.label_autoencoder == "pretrained":
            found.append(Phase("autoencoder", train.autoencoder_pretrain_fraction, "mask autoencoder"))
        return found

    @property
    def pretrain_parts(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases(TrainConfig()))

    def prepare_training(self, train: TrainConfig) -> None:
        """Nothing to prepare: every part trains from its initial weights."""

    def load_pretrained(self) -> None:
        """Nothing pre-trained to load (CFENet and the mask autoencoder train within the run)."""

    def pretrain_losses(
        self, image: torch.Tensor, label: torch.Tensor, parts: tuple[str, ...], gamma: float = 2.0, lam: float = 1e-5
    ) -> Losses:
        """The summed pre-training losses of `parts` (see `condition_losses`, `autoencoder_losses`)."""
        losses = {
            "condition": lambda: self.condition_losses(image, label, gamma),
            "autoencoder": lambda: self.autoencoder_losses(label, lam),
        }
        return Losses(*(sum(terms) for terms in zip(*(losses[p]() for p in parts), strict=True)))

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
        for name in names[part]:
            getattr(self, name).requires_grad_(False)


def _chain_sampler(model: LatentSegmenter, options: SampleConfig) -> ChainSampler:
    c, options = model.config, concrete_sampling(options)
    return ChainSampler(
        model.schedule,
        c.prediction_type,
        options.steps,
        options.eta,
        post_step=standardize if c.restandardize else None,
        final_x0=model.heads.final_x0(),
    )


def _staged_sampler(model: LatentSegmenter, options: SampleConfig) -> StagedSampler:
    return StagedSampler(model.schedule, model.stages, options.staged_middle_steps, options.staged_final_head)


SAMPLERS = {"ddim": _chain_sampler, "staged": _staged_sampler}
