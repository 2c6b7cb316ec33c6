"""Configuration: defaults live in code, a YAML file or `key=value` arguments override them.

Each override must match its default's type. The resolved config is logged and saved as
`config.json` beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_origin

import yaml

from latentseg.errors import LatentSegError, one_line
from latentseg.schema import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
    Range,
    Seed,
    hints,
    problems,
    value_problem,
)


@dataclass
class ModelConfig:
    """The LDSeg networks and the diffusion they are trained with (003 section IV-B)."""

    spatial_dims: Literal[2, 3] = 2  # set from the data by `train`
    in_channels: PositiveInt = 1  # set from the data by `train`
    num_classes: Annotated[int, Range(2)] = 2  # set from the data by `train` (background included)
    latent_channels: PositiveInt = 4  # k, channels of z_label
    image_latent_channels: PositiveInt = 16  # channels of z_image
    # latent downsamplings: "auto" plans them from the training labels (the coarsest latent whose
    # label ceiling reaches `latent_ceiling` per class, see latentseg.data.planning); 003 uses 4
    num_downsamplings: Literal["auto"] | Annotated[int, Range(1, 8)] = "auto"
    latent_ceiling: Annotated[float, Range(0, 1)] = 0.98
    strides: list[int | list[PositiveInt]] = field(
        default_factory=list
    )  # per stage, an int or one per axis; empty: planned by `train`
    # widths per resolution, full resolution first (encoders start with a strided convolution,
    # so their first entry is unused; the decoder's is used only with decoder_skips)
    image_encoder_channels: list[PositiveInt] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    label_encoder_channels: list[PositiveInt] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    decoder_channels: list[PositiveInt] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    # feed the image encoder's features to the label decoder (thin structures); "auto": planned, on
    # when no latent of at least `min_latent_downsamplings` reaches the ceiling
    decoder_skips: Literal["auto"] | bool = "auto"
    # with skips, the decoder also reads z_image beside the label latent (the image's deepest
    # features, which skips alone would leave out); auto: on with skips
    decoder_image_latent: Literal["auto"] | bool = "auto"
    # with skips, also fuse the input image at full resolution (a costly last stage); auto: planned
    # off (measured: most of the decoder's time on ACDC), on for models saved before it was planned
    decoder_full_skip: Literal["auto"] | bool = "auto"
    # kernel of the convolution that fuses an image skip into the decoder at each level: 3 (a 3x3
    # convolution over both, as saved before it was planned) or 1 (pointwise; the residual block
    # that follows mixes space). auto: planned 1 (cheaper, and more accurate at equal minutes on
    # ACDC); unplanned (models saved before it existed), 3
    decoder_fuse_kernel: Literal["auto"] | Literal[1, 3] = "auto"
    # also decode the clean label latent with the image side (skips, z_image) zeroed: an autoencoder
    # term, so the latent must hold the mask. "auto": planned on with decoder skips on data with
    # several annotators (see `diffusion_trains_label_encoder`)
    latent_reconstruction: Literal["auto"] | bool = "auto"
    # the diffusion loss (and the segmentation of the denoiser's estimate) train the label encoder
    # too (003, end to end). With skips that lets the encoder make a latent the denoiser predicts
    # exactly from the image (BU-BIL: a full and an empty mask encoded 0.5% apart; the decoder
    # ignored the latent, so every sample was the same). false: those terms take the latent as a
    # constant and the encoder learns from `latent_reconstruction` alone. "auto": false with skips on
    # data with several annotators (on ACDC, one mask per case, it cost 0.07 Dice: kept true there)
    diffusion_trains_label_encoder: Literal["auto"] | bool = "auto"
    min_latent_downsamplings: Annotated[int, Range(1, 8)] = 3  # a finer latent makes the denoiser slow
    # image encoder stages ending in self-attention. 003 has 2; one (the coarsest) since 2026-12-06:
    # 15 minutes side by side, ACDC 0.769 with one against 0.765 with two, MoNuSeg 0.798 against
    # 0.799, with 7-9% more steps; one 2D 256^2 sample 1.13x a UNet's time in torch instead of 1.4x
    attention_stages: NonNegativeInt = 1
    num_heads: PositiveInt = 4
    denoiser_channels: list[PositiveInt] = field(default_factory=lambda: [64, 128])
    denoiser_strides: list[int | list[PositiveInt]] = field(
        default_factory=list
    )  # empty: planned from the latent grid by `train`
    prediction_type: Literal["eps", "x0", "v"] = "x0"  # eps | x0 | v
    schedule: Literal["linear", "cosine"] = "linear"  # linear | cosine
    num_timesteps: Annotated[int, Range(2, 100_000)] = 1000
    x0_estimate: Literal["exact", "paper"] = (
        "exact"  # exact: invert Eq. 11 | paper: z_t - eps_hat (003 Eq. 12 as printed)
    )
    restandardize: bool = False  # re-standardize the latent after every sampling step
    # learned: the image encoder trains end to end with the rest (003) | pretrained: CFENet (004 section
    # 2.3), the image encoder plus a UNet decoder trained for segmentation first, then frozen, its
    # features injected into every denoiser encoder level by dual cross-attention
    condition: Literal["learned", "pretrained"] = "learned"
    # CFENet's decoder: without skips its bottleneck (the only features at the latent's resolution,
    # which is where the denoiser works) must hold the whole mask; with skips it is a UNet
    condition_head_skips: bool = False
    # joint: label encoder and decoder train end to end with the rest (003) | pretrained: 002's
    # two-stage mask autoencoder, trained alone first (Eq. 3: BCE + Dice + weight decay), then frozen
    # while the diffusion trains with the MSE on the latent alone
    label_autoencoder: Literal["joint", "pretrained"] = "joint"
    # 000 Table II ablations: learned networks | downsample (average pooling + a 1x1 convolution)
    image_encoder: Literal["learned", "downsample"] = "learned"
    label_encoder: Literal["learned", "downsample"] = "learned"
    # text guidance (000 section II-B): none | attention (Eq. 2: image-latent voxels attend to the
    # tokens of a frozen text encoder) | concat (the pooled sentence embedding joins the image latent)
    text_fusion: Literal["none", "attention", "concat"] = "none"
    text_encoder: str = "all-MiniLM-L6-v2"  # a local folder or a cached hub name; default: shipped copy
    text_dim: NonNegativeInt = 0  # set by `train` from the text encoder
    text_max_length: Annotated[int, Range(1, 512)] = 64  # tokens; longer text is truncated with a warning
    text_in_denoiser: bool = False  # attention fusion: every denoiser encoder level also attends to the tokens
    # UniSegDiff (004 section 2.1-2.2): 2 = one denoiser encoder with an eps head and an x0 head
    denoiser_heads: Literal[1, 2] = 1
    # two heads: also decode the eps head's x0 estimate (t <= stage_high, where sampling uses that head)
    # and add its segmentation loss, as 003 trains its eps denoiser; 004 decodes the x0 head only
    eps_head_seg_loss: bool = False
    stage_high: PositiveInt = 600  # t > stage_high: rapid segmentation stage (x0); staged sampling jumps 999 -> high-1
    stage_low: PositiveInt = 300  # t <= stage_low: denoising refinement stage (eps); staged sampling ends there
    # universal prompted segmentation (002): none | class (a learned embedding per target name) |
    # text (the text encoder's embedding of the name). Each (case, target) is a binary task and the
    # prompt joins the image latent through `text_fusion` (attention unless set)
    prompt: Literal["none", "class", "text"] = "none"
    prompt_names: list[str] = field(default_factory=list)  # set by `train`: the target names, in id order
    # ldseg: the latent diffusion segmenter above (003, with 000 / 004 options) | textdiff (001): a
    # frozen pretrained DDPM UNet's decoder features at a few noise levels, fused with the text by
    # cross-attention per block, and a pixel classifier; only the attention and classifier train
    mode: Literal["ldseg", "textdiff"] = "ldseg"
    backbone: str = ""  # textdiff: the diffusers UNet2DModel folder trained on (e.g. by `pretrain-ddpm`)
    backbone_config: dict = field(default_factory=dict)  # textdiff: that UNet's config, set by `train`
    feature_blocks: list[NonNegativeInt] = field(
        default_factory=lambda: [6, 8, 12, 16]
    )  # decoder block ids, 001 section 3
    feature_timesteps: list[NonNegativeInt] = field(default_factory=lambda: [50, 150, 250])  # 001 section 2.1
    feature_channels: PositiveInt = 32  # textdiff: width of each block's features after projection


@dataclass
class DataConfig:
    patch_size: list[PositiveInt] = field(default_factory=list)  # empty: 256^2 in 2D, 96^3 in 3D, shrunk to the images
    split: str = "random"  # random | dataset | fold:I/K | path/to/split.csv (see latentseg.data.splits)
    val_fraction: OpenFraction = 0.1
    # target spacing; empty: 2D images keep their grid and 3D volumes take the training median, both
    # coarsened by `grid_factor`
    spacing: list[PositiveFloat] = field(default_factory=list)
    resample: bool = True  # 3D: reorient to RAS and resample to `spacing`
    # how much coarser than the images' own grid (2D) or the training median spacing (3D) to train
    # and predict, unless `spacing` is set; auto: 1, or 2 or 4 where the structures span more than
    # two patches and the labels survive it (latentseg.data.planning.plan_grid_factor)
    grid_factor: Literal["auto"] | Annotated[int, Range(1, 16)] = "auto"
    crop_foreground: bool = True  # crop to the image's non-zero region (nnU-Net)
    mask_values: list[NonNegativeInt] = field(
        default_factory=list
    )  # stored value per class for 2D masks, e.g. [0, 255]
    foreground_fraction: Fraction = 0.3333  # share of patches centred on a foreground voxel (nnU-Net)
    # where the other patches go: uniform (anywhere in the image, as nnU-Net) | posneg (MONAI's
    # RandCropByPosNegLabeld: centred on a background voxel)
    patch_sampling: Literal["uniform", "posneg"] = "uniform"
    # several annotators (raters/<name>/ beside the masks): random (each patch takes one annotator's
    # mask at random, as the multi-annotator methods train) | majority (their per-voxel majority) |
    # none (the dataset's own masks); auto: random where a dataset has annotators
    raters: Literal["auto", "random", "majority", "none"] = "auto"
    # augmentation: "auto" turns the three kinds below on only for long runs (more than
    # AUGMENT_AFTER_MINUTES, or than AUGMENT_AFTER_STEPS without a time budget): at 15 minutes on
    # ACDC they cost a plain UNet 0.1 Dice (benchmarks/results/pipeline.json), at 60 minutes latentseg
    # 0.05 (results/realdata.json) | "on" | "off"
    augmentation: Literal["auto", "on", "off"] = "auto"
    flips: bool = True
    # words a flip of an axis swaps in a case's description, "AXIS:word/word" entries; "auto": 2D
    # rows upper/lower and columns left/right, 3D the RAS axes (see latentseg.data.transforms); []: none
    text_flip_words: list[str] = field(default_factory=lambda: ["auto"])
    rotation_degrees: Annotated[float, Range(0, 180)] = 15.0  # random in-plane rotations up to this angle (0: off)
    intensity_augmentation: bool = True
    # Gaussian noise I + N(0, sigma) on a patch scaled to [0, 1] per channel (003 Eq. 19, as the
    # robustness benchmark adds it), sigma drawn uniformly up to this, on a share of patches
    # (noise_probability); independent of `augmentation`; 0: off
    noise_augmentation: Annotated[float, Range(0, 1)] = 0.0
    noise_probability: Fraction = 0.5
    allow_missing_text: bool = False  # text models: cases without a description get "no description"
    label_map: str = ""  # model.prompt: YAML {dataset folder: {label id: shared name}}; default: own names
    # largest image accepted, in voxels, checked from the file's header before its data is read
    max_voxels: PositiveInt = 2**29
    # GiB of preprocessed training cases held in memory; the cases past it are kept in .npy files
    # in `cache_dir` (default: the system's temporary folder) and read patch by patch; auto: half
    # of the machine's memory
    memory_gb: Literal["auto"] | PositiveFloat = "auto"
    cache_dir: str = ""
    # dataset.json paths (`../`) and symlinks that lead out of the dataset folder are refused unless set
    allow_outside_paths: bool = False


@dataclass
class TrainConfig:
    # "auto": DEFAULT_TRAIN_STEPS, or with `max_minutes` no step limit (the clock ends the run and
    # drives the learning rate), so that a time budget is used whatever the machine's speed
    steps: Literal["auto"] | PositiveInt = "auto"
    # stop after this many minutes of training even before `steps` (0: no limit; validation is not
    # counted); the learning rate follows this clock
    max_minutes: NonNegativeFloat = 0.0
    batch_size: Literal["auto"] | PositiveInt = "auto"  # auto: 8 for 2D, 2 for 3D (nnU-Net's 3D batch)
    lr: PositiveFloat = 1e-3
    min_lr_ratio: Fraction = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: NonNegativeInt = 50
    weight_decay: NonNegativeFloat = 1e-4
    # the weights' exponential moving average that validation, calibration and the saved model use
    # (latentseg.averaging): decay min(ema_decay, (1 + t) / (10 + t)) at step t, so a run shorter
    # than about 9 / (1 - ema_decay) steps averages its last ninth; 0: the last step's weights
    ema_decay: OpenFraction = 0.999
    gamma_dice: NonNegativeFloat = 2.0  # 003 Eq. 16
    lambda_noise: NonNegativeFloat = 1.0  # 003 Eq. 18
    # uniform (003 Algorithm 1) | staged (004 section 2.2, with alpha:beta per stage) | importance
    # (002 section 3.1: t drawn in proportion to its recent loss, see latentseg.diffusion.timesteps)
    timesteps: Literal["uniform", "staged", "importance"] = "uniform"
    importance_bins: PositiveInt = 50  # importance: timesteps grouped into this many intervals (num_timesteps: per t)
    importance_history: PositiveInt = 10  # importance: losses remembered per interval before it leaves uniform
    last_stage_t: Literal["zero", "sampled"] = (
        "zero"  # staged: t <= stage_low is set to 0 (004) | "sampled": kept as drawn
    )
    condition_pretrain_fraction: OpenFraction = 0.3  # model.condition=pretrained: share of the run that trains CFENet
    autoencoder_pretrain_fraction: OpenFraction = 0.3  # model.label_autoencoder=pretrained: share that trains it
    autoencoder_weight_decay: NonNegativeFloat = 1e-5  # lambda of 002 Eq. 3
    # textdiff: keep each training image's frozen-backbone features (fixed noise per image), up to
    # this many MB (0: off; computed anew each step). Hits only when images repeat exactly: turn off
    # data.flips / rotation_degrees / intensity_augmentation and make the patch the whole image
    feature_cache_mb: NonNegativeFloat = 0.0
    val_every: NonNegativeInt = 500  # steps between validations (0: never)
    val_cases: NonNegativeInt = 8
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 25
    seed: Seed = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda means each rank's LOCAL_RANK GPU)
    distributed_timeout_minutes: PositiveFloat = 30.0  # torchrun: a rank waiting longer than this for another fails


@dataclass
class SampleConfig:
    # DDIM steps K (003 section V-B: 2 suffice) and eta; "auto": planned by `train` from the data
    # (latentseg.data.prepare.plan_sampling): DDIM-1 (x0; eps: 2), eta 0, or where the training
    # data has several annotators the candidate whose samples spread as the annotators disagree,
    # fitted on the validation cases at the end of training (latentseg.sampler_fit; DDIM-10, eta 1
    # without validation cases)
    steps: Literal["auto"] | PositiveInt = "auto"
    # samples per image; "auto": planned by `train` from the validation cases: 1 where their samples
    # agree (one annotator and a deterministic sampler: more would repeat the same mask at N times
    # the cost), else AUTO_SAMPLES; unplanned: AUTO_SAMPLES
    num_samples: Literal["auto"] | PositiveInt = "auto"
    sampler: Literal["ddim", "staged"] = (
        "ddim"  # ddim (DDPM when steps is None) | staged (004 section 2.2; needs denoiser_heads=2)
    )
    staged_middle_steps: PositiveInt = 10  # staged: DDIM steps from stage_high-1 to stage_low-1 with each head
    staged_final_head: Literal["eps", "x0"] = (
        "eps"  # staged: the head of the last step from stage_low-1 (004: eps) | x0
    )
    fusion: Literal["mean", "vote", "staple"] = "mean"  # mean | vote | staple (004 section 2.4)
    eta: Literal["auto"] | Fraction = "auto"
    # the fused probabilities' temperature, softmax(log p / T) (Guo et al. 2017); "auto": fitted by
    # `train` on the validation cases at the end of training (minimum NLL), 1 = as sampled
    temperature: Literal["auto"] | PositiveFloat = "auto"
    # classes whose label keeps only its largest connected component (latentseg.postprocess);
    # "auto": planned by `train`, the classes that are one structure in the training labels
    # (unplanned: none); [] for none
    largest_component: Literal["auto"] | list[PositiveInt] = "auto"
    overlap: OpenFraction = 0.5  # sliding-window overlap
    sw_batch_size: PositiveInt = 1
    # samples the label decoder takes at once; "auto": one at a time for 2D images on a CPU, all
    # together in 3D and on a GPU (measured: benchmarks/results/inference.json, decode_batch_*)
    decode_batch: Literal["auto"] | PositiveInt = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Every setting outside its type or range, one line each (`train.lr must be > 0, got -1.0`)."""
        return [line for name, section in _sections(self).items() for line in problems(section, f"{name}.")]

    def validate(self, source: str = "config") -> Config:
        """The config itself, or a LatentSegError listing every bad setting, each naming `source`."""
        found = self.problems()
        if found:
            raise LatentSegError("\n".join(f"{source}: {line}" for line in found))
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        config = cls()
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise LatentSegError(f"{source}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value, source, parse=False)
        return config.validate(source)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LatentSegError(f"{path}: cannot read the config: {one_line(err)}") from err
        if not isinstance(raw, dict):
            raise LatentSegError(f"{path}: a config must hold a JSON object of sections, got {type(raw).__name__}")
        return cls.from_dict(raw, str(path))


DEFAULT_TRAIN_STEPS = 2000


def step_limit(train: TrainConfig) -> int | None:
    """The run's last step: `train.steps`, or for "auto" DEFAULT_TRAIN_STEPS without a time budget
    and None (no limit) with one."""
    if train.steps != "auto":
        return train.steps
    return None if train.max_minutes > 0 else DEFAULT_TRAIN_STEPS


# what "auto" sampling means for a model whose plan does not set it (saved before it was planned,
# or built without `train`): 003's DDIM-2, deterministic
AUTO_SAMPLES = 4
UNPLANNED_SAMPLING = {"steps": 2, "eta": 0.0, "temperature": 1.0, "num_samples": AUTO_SAMPLES}


def concrete_sampling(sample: SampleConfig) -> SampleConfig:
    """`sample` with "auto" steps, eta, temperature and sample count as UNPLANNED_SAMPLING (a planned
    model has none left but a temperature and a count its training had no validation cases for)."""
    changes = {k: v for k, v in UNPLANNED_SAMPLING.items() if getattr(sample, k) == "auto"}
    return replace(sample, **changes) if changes else sample


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _resolve(config: Config, key: str, source: str) -> tuple[Any, str]:
    """'model.latent_channels' or an unambiguous bare 'latent_channels' -> (section object, field)."""
    sections = _sections(config)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections or name not in {f.name for f in fields(sections[section])}:
            raise LatentSegError(f"{source}: unknown setting {key!r}; known: {', '.join(known_keys(config))}")
        return sections[section], name
    owners = [s for s in sections.values() if key in {f.name for f in fields(s)}]
    if len(owners) != 1:
        what = "ambiguous" if owners else "unknown"
        raise LatentSegError(f"{source}: {what} setting {key!r}; known: {', '.join(known_keys(config))}")
    return owners[0], key


def known_keys(config: Config) -> list[str]:
    return [f"{name}.{f.name}" for name, section in _sections(config).items() for f in fields(section)]


def _coerce(value: Any, default: Any, key: str, source: str, parse: bool) -> Any:
    if parse and isinstance(value, str):
        if isinstance(default, str):
            return value
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise LatentSegError(f"{source}: cannot parse {key}={value!r}") from err
    expected = type(default)
    if isinstance(default, float) and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        value = list(value) if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) else value
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise LatentSegError(
            f"{source}: {key} must be a {expected.__name__} like its default {default!r}, got {value!r}"
        )
    return value


def _set(config: Config, key: str, value: Any, source: str, parse: bool) -> None:
    section, name = _resolve(config, key, source)
    hint = hints(type(section))[name]
    if get_origin(hint) in (Union, UnionType):  # e.g. "auto" or a number: the value's own type decides
        setattr(section, name, _coerce_choice(value, hint, parse))
    else:
        setattr(section, name, _coerce(value, getattr(section, name), key, source, parse))


def _coerce_choice(value: Any, hint: Any, parse: bool) -> Any:
    """A value for a field of several types: the YAML reading of a string when it fits, else as given
    (`validate` names what does not fit)."""
    if parse and isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if value_problem(parsed, hint) is None or not isinstance(parsed, str):
            return parsed  # a number out of range is refused by `validate`, naming the range
    return value


PRESETS = Path(__file__).parent / "presets"


def presets() -> list[str]:
    """Names of the shipped presets, one per paper's setup (latentseg/presets/NAME.yaml)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file, or the name of a shipped preset."""
    path = Path(name)
    if path.is_file():
        return path
    if str(name) in presets():
        return PRESETS / f"{name}.yaml"
    raise LatentSegError(f"{name}: no such config file, and not a preset (presets: {', '.join(presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a YAML file or preset, then `key=value` overrides (dotted or bare keys)."""
    config = Config()
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise LatentSegError(f"{path}: cannot read the config file: {one_line(err)}") from err
        if not isinstance(raw, dict):
            raise LatentSegError(f"{path}: a config file must be a mapping of sections")
        config = Config.from_dict(raw, str(path))
    apply_overrides(config, overrides or [])
    return config


def apply_overrides(config: Config, overrides: list[str]) -> None:
    """Apply `key=value` strings in place; each value must match its default's type."""
    for item in overrides:
        if "=" not in item:
            raise LatentSegError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        _set(config, key.strip(), value.strip(), "override", parse=True)
    config.validate("override" if overrides else "config")
