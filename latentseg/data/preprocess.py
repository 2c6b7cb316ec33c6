"""Deterministic preprocessing as invertible MONAI dictionary transforms (002 section 3.1).

Orientation to RAS and resampling to a target spacing (3D NIfTI only), a crop to the image's
non-zero region (as nnU-Net), then intensity normalisation: CT channels are clipped to the
training foreground's 0.5-99.5 percentiles and z-scored with its mean and std (as nnU-Net);
every other channel (MR, RGB, ...) is z-scored per image. Predictions go back to the input grid
through `monai.transforms.Invertd`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    Spacingd,
)

from latentseg.data.io import ImageMeta, compact_label
from latentseg.errors import LatentSegError
from latentseg.schema import PositiveFloat, check_mapping

CT_NAMES = ("ct", "computed tomography")


def is_ct(channel_name: str) -> bool:
    return channel_name.strip().lower() in CT_NAMES or channel_name.strip().lower().startswith("ct ")


class NormalizeChannelsd(MapTransform):
    """Per channel: CT -> clip to [lo, hi], then (x - mean) / std with dataset statistics;
    anything else -> z-score over the image (MONAI's NormalizeIntensity).

    MONAI normalizes all channels one way; mixed CT + MR inputs need both, hence this transform.
    """

    def __init__(self, keys, ct_channels: Mapping[int, Mapping[str, float]]):
        super().__init__(keys)
        self.ct_channels = {int(k): v for k, v in ct_channels.items()}
        self.zscore = NormalizeIntensity()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = []
            for c in range(image.shape[0]):
                stats = self.ct_channels.get(c)
                if stats is None:
                    channels.append(self.zscore(image[c]))
                else:
                    channels.append((image[c].clamp(stats["lo"], stats["hi"]) - stats["mean"]) / stats["std"])
            d[key] = torch.stack(channels).to(torch.float32)
        return d


@dataclass
class Preprocessing:
    """What is done to every image before the network sees it; saved in `fingerprint.json`."""

    spatial_dims: Literal[2, 3]
    spacing: list[PositiveFloat] | None = None  # target spacing; None keeps the input's grid
    orientation: Literal["RAS"] | None = "RAS"  # applies to 3D inputs only
    crop_foreground: bool = True
    ct_channels: dict[str, dict[str, float]] = field(default_factory=dict)  # channel -> lo, hi, mean, std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
        problems = check_preprocessing(raw, source)
        if problems:
            raise LatentSegError("\n".join(problems))
        return cls(**raw)

    def transform(self, keys: tuple[str, ...] = ("image",)) -> Compose:
        """The chain for `keys`; "image" comes first, a "label" is resampled nearest-neighbour."""
        keys = list(keys)
        steps: list = []
        if self.orientation and self.spatial_dims == 3:
            steps.append(Orientationd(keys, axcodes=self.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        if self.spacing:
            modes = ["bilinear" if k == "image" else "nearest" for k in keys]  # labels and annotators' masks
            steps.append(Spacingd(keys, pixdim=self.spacing, mode=modes))
        if self.crop_foreground:
            steps.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
        steps.append(NormalizeChannelsd("image", {int(k): v for k, v in self.ct_channels.items()}))
        return Compose(steps)


def check_preprocessing(raw: Any, source: str) -> list[str]:
    """Problems of a saved `Preprocessing` (types, keys, CT statistics), each naming `source`."""
    problems = check_mapping(raw, Preprocessing, source, required=("spatial_dims",))
    for channel, stats in (raw.get("ct_channels") or {}).items() if not problems else ():
        ok = isinstance(stats, dict) and all(
            isinstance(stats.get(k), (int, float)) for k in ("lo", "hi", "mean", "std")
        )
        if not ok or not str(channel).isdigit():
            problems.append(f"{source}: ct_channels[{channel!r}] must map a channel number to lo, hi, mean, std")
    return problems


def to_meta_tensor(array: np.ndarray, meta: ImageMeta) -> MetaTensor:
    """A channel-first array carrying the file's affine (identity for 2D images)."""
    affine = meta.affine if meta.affine is not None else np.eye(meta.spatial_dims + 1)
    if affine.shape[0] != meta.spatial_dims + 1:  # a 2D NIfTI slice: its in-plane part
        keep = [*range(meta.spatial_dims), affine.shape[0] - 1]
        affine = affine[np.ix_(keep, keep)]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine))


CT_VALUES_PER_CASE = 10_000  # intensities drawn per case for the CT statistics, as nnU-Net's fingerprint


def intensity_sample(image: np.ndarray, label: np.ndarray, channel: int, rng: np.random.Generator) -> dict:
    """Up to CT_VALUES_PER_CASE of one case's foreground intensities in `channel`, and as many of all
    its voxels (used only where no case has foreground), drawn at random: all that the CT statistics
    need of an image, so the image itself need not stay in memory."""

    def pick(values: np.ndarray) -> np.ndarray:
        return values if values.size <= CT_VALUES_PER_CASE else values[rng.integers(0, values.size, CT_VALUES_PER_CASE)]

    return {"foreground": pick(image[channel][label[0] > 0]), "all": pick(image[channel].ravel())}


def ct_statistics_of(samples: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """nnU-Net's CT normalisation statistics (0.5 and 99.5 percentiles, mean and std within them) of
    every training case's `intensity_sample`, pooled: foreground voxels, or all voxels where no case
    has foreground."""
    values = np.concatenate([s["foreground"] for s in samples])
    if values.size == 0:
        values = np.concatenate([s["all"] for s in samples])
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, lo, hi)
    return {"lo": float(lo), "hi": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std() + 1e-8)}


def preprocess_sample(sample: dict[str, Any], prep: Preprocessing) -> dict[str, np.ndarray]:
    """A training sample's image and label (and its annotators' masks), mapped into the network's space."""
    meta = sample["meta"]
    keys = ("image", "label", "raters") if "raters" in sample else ("image", "label")
    data = {key: to_meta_tensor(sample[key], meta) for key in keys}
    out = prep.transform(keys)(data)
    mapped = {"image": out["image"].numpy().astype(np.float32)}
    mapped |= {key: compact_label(np.rint(out[key].numpy())) for key in keys[1:]}
    return mapped


def prepare_image(image: np.ndarray, meta: ImageMeta, prep: Preprocessing) -> tuple[MetaTensor, Compose]:
    """The network's input for one image, and the transform that produced it (for `restore`)."""
    transform = prep.transform(("image",))
    return transform({"image": to_meta_tensor(image, meta)})["image"], transform


def restore(outputs: dict[str, torch.Tensor], reference: MetaTensor, transform: Compose) -> dict[str, np.ndarray]:
    """Map (C, *S) outputs computed on `reference`'s grid back onto the original image grid."""
    data: dict[str, Any] = {"image": reference}
    for key, value in outputs.items():
        data[key] = MetaTensor(value, meta=reference.meta, applied_operations=list(reference.applied_operations))
    inverted = Invertd(list(outputs), transform=transform, orig_keys="image")(data)
    return {key: inverted[key].detach().cpu().numpy() for key in outputs}


def complete_background(probabilities: np.ndarray, classes: int) -> np.ndarray:
    """Restored (N*C, *S) class probabilities, each group of C summing to 1 again: `restore` pads
    with zeros where the network saw nothing (outside the foreground crop, which is background by
    construction), and interpolation mixes that padding into the voxels beside it; the missing mass
    is the padding's share, so it goes to the background, class 0 of each group (in place where the
    array is contiguous; the completed array is returned either way)."""
    groups = probabilities.reshape(-1, classes, *probabilities.shape[1:])
    missing = np.clip(1.0 - groups.sum(1), 0.0, 1.0)
    groups[:, 0] += missing.astype(groups.dtype)
    return groups.reshape(probabilities.shape)
