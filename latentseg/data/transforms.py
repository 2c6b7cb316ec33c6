"""Training augmentation as MONAI dictionary transforms acting on "image" and "label"
(000 section III-B: flips, rotations, intensity scaling and shifts), and on a case's "text":
a flip swaps the words that name the two sides of the flipped axis, so that "the lesion in the
upper left" still describes the flipped image."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    Flipd,
    MapTransform,
    RandCropByPosNegLabeld,
    RandomizableTransform,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from latentseg.config import DataConfig

WordPairs = dict[int, list[tuple[str, str]]]


# "auto": 2D images are shown with axis 0 as rows (top to bottom) and axis 1 as columns; 3D volumes
# are read reoriented to RAS+ (data.resample): axis 0 runs left to right, 1 back to front, 2 foot to head
AUTO_FLIP_WORDS = {
    2: ["0:upper/lower", "0:top/bottom", "0:above/below", "1:left/right"],
    3: ["0:left/right", "1:anterior/posterior", "1:front/back", "2:superior/inferior", "2:upper/lower"]
    + ["2:top/bottom", "2:above/below", "2:cranial/caudal"],
}


def flip_word_pairs(entries: Sequence[str], spatial_dims: int | None = None) -> WordPairs:
    """Parse `data.text_flip_words` entries "AXIS:word/word" (e.g. "1:left/right") into
    {axis: [(word, word), ...]}; ["auto"] is `AUTO_FLIP_WORDS` for `spatial_dims` (nothing is checked
    while the dimensionality is unknown). A malformed entry or an axis beyond `spatial_dims` is a
    ValueError."""
    if list(entries) == ["auto"]:
        if spatial_dims not in AUTO_FLIP_WORDS:
            return {}
        entries = AUTO_FLIP_WORDS[spatial_dims]
    pairs: WordPairs = {}
    for entry in entries:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*([^\s/]+)\s*/\s*([^\s/]+)\s*", str(entry))
        if not match:
            raise ValueError(f"data.text_flip_words: {entry!r} is not AXIS:word/word, e.g. '1:left/right'")
        axis, first, second = int(match[1]), match[2].lower(), match[3].lower()
        if spatial_dims is not None and axis >= spatial_dims:
            raise ValueError(f"data.text_flip_words: {entry!r} names axis {axis} of {spatial_dims}D images")
        pairs.setdefault(axis, []).append((first, second))
    return pairs


def swap_words(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    """`text` with each word of `pairs` replaced by its partner (whole words, any case:
    "Upper-left" -> "Lower-left" for ("upper", "lower"))."""
    mapping = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    if not mapping or not text:
        return text
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b", re.IGNORECASE)

    def partner(match: re.Match) -> str:
        word, other = match[0], mapping[match[0].lower()]
        if word.isupper() and len(word) > 1:
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return pattern.sub(partner, text)


class RandFlipTextd(RandomizableTransform):
    """With probability `prob`, flip `keys` along spatial `axis` and swap the side words of that
    axis in the sample's "text" (absent or empty text is left alone)."""

    def __init__(self, keys: Sequence[str], axis: int, pairs: Sequence[tuple[str, str]], prob: float = 0.5):
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=axis)
        self.pairs = list(pairs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        if not self._do_transform:
            return dict(data)
        out = self.flip(data)
        if out.get("text"):
            out["text"] = swap_words(out["text"], self.pairs)
        return out


class RandRaterd(RandomizableTransform):
    """The label replaced by one annotator's mask, drawn at random each time (samples without
    annotators pass unchanged)."""

    def __init__(self) -> None:
        RandomizableTransform.__init__(self, 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        raters = d.pop("raters", None)
        if raters is not None:
            d["label"] = raters[self.R.randint(len(raters))][None]
        return d


class RandRangeNoised(RandomizableTransform):
    """003 Eq. 19 as a training augmentation: with probability `prob`, the "image" plus Gaussian noise
    of a standard deviation drawn uniformly from [0, sigma_max] of each channel's range in the patch
    (the image scaled to [0, 1], noised, mapped back), so that the noise is the same relative size
    whatever the intensity normalisation."""

    def __init__(self, sigma_max: float, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.sigma_max = sigma_max

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image = torch.as_tensor(d["image"])
        flat = image.reshape(image.shape[0], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        scale = torch.where(hi > lo, hi - lo, torch.ones_like(hi)).reshape(-1, *[1] * (image.dim() - 1))
        sigma = self.R.uniform(0.0, self.sigma_max)
        noise = torch.from_numpy(self.R.standard_normal(tuple(image.shape)).astype("float32"))
        d["image"] = image + (sigma * noise).to(image.dtype) * scale
        return d


class RandForegroundCropd(RandomizableTransform, MapTransform):
    """A `patch_size` patch of `keys`, zero-padded (centred, as MONAI's SpatialPadd pads) where the
    image is smaller: with probability `foreground`, centred on a random foreground voxel of the
    label (kept inside the image), otherwise anywhere, uniformly (nnU-Net's patch placement).

    Only the patch is read, so an image kept in a file (`np.memmap`, see
    `latentseg.data.prepare.spill`) is sliced rather than loaded; such a sample carries a sample of
    its foreground voxels under `coordinates_key`, as nnU-Net stores class locations, instead of
    the label being searched at every draw."""

    def __init__(
        self,
        keys: Sequence[str],
        patch_size: Sequence[int],
        foreground: float,
        label_key: str = "label",
        coordinates_key: str = "foreground",
    ):
        RandomizableTransform.__init__(self, 1.0)
        MapTransform.__init__(self, keys)
        self.patch, self.foreground, self.label_key = [int(p) for p in patch_size], foreground, label_key
        self.coordinates_key = coordinates_key

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        shape = d[self.label_key].shape[1:]
        padded = [max(s, p) for s, p in zip(shape, self.patch, strict=True)]
        before = [(q - s) // 2 for q, s in zip(padded, shape, strict=True)]
        voxels = self._foreground(d) if self.R.random() < self.foreground else None
        if voxels is not None and len(voxels):
            centre = [int(v) + b for v, b in zip(voxels[self.R.randint(len(voxels))], before, strict=True)]
            start = [min(max(0, c - p // 2), q - p) for c, p, q in zip(centre, self.patch, padded, strict=True)]
        else:
            start = [self.R.randint(0, q - p + 1) for p, q in zip(self.patch, padded, strict=True)]
        for key in self.key_iterator(d):
            d[key] = patch_of(d[key], [a - b for a, b in zip(start, before, strict=True)], self.patch)
        d.pop(self.coordinates_key, None)
        return [d]  # a list of one patch, as MONAI's cropping transforms with num_samples=1

    def _foreground(self, d: Mapping[Hashable, Any]) -> np.ndarray:
        """(N, dims) foreground voxels, in C order."""
        if self.coordinates_key in d:
            return d[self.coordinates_key]
        return np.argwhere(np.asarray(d[self.label_key][0]) > 0)


def patch_of(array, start: Sequence[int], size: Sequence[int]):
    """array[:, start:start + size] per axis, zero where the window leaves the array; reads only
    the window (of an np.memmap too). Tensors stay tensors, arrays become in-memory arrays."""
    shape = array.shape[1:]
    lo = [max(0, a) for a in start]
    hi = [min(s, a + p) for s, a, p in zip(shape, start, size, strict=True)]
    part = array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))]
    if list(part.shape[1:]) == list(size):
        return part if isinstance(part, torch.Tensor) else np.array(part)
    out = (torch.zeros if isinstance(part, torch.Tensor) else np.zeros)((array.shape[0], *size), dtype=part.dtype)
    out[(slice(None), *(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True)))] = part
    return out


def train_transforms(patch_size: Sequence[int], config: DataConfig, swap_text: bool = True) -> Compose:
    """Pad, crop (a share of patches centred on foreground, as nnU-Net), flip, rotate in-plane,
    jitter intensity, add noise (`noise_augmentation`). With `swap_text`, flips swap
    `config.text_flip_words` in the "text" (off for prompts that name a structure: a mirrored left
    ventricle is still the left ventricle)."""
    keys = ["image", "label"]
    fg = config.foreground_fraction
    crop = (
        RandForegroundCropd(keys, patch_size, fg)
        if config.patch_sampling == "uniform"
        else RandCropByPosNegLabeld(keys, "label", patch_size, pos=fg, neg=1 - fg, num_samples=1)
    )
    # the uniform crop pads its patch itself (and reads only the patch); MONAI's needs the padding first
    steps: list = [crop] if config.patch_sampling == "uniform" else [SpatialPadd(keys, spatial_size=patch_size), crop]
    if config.augmentation == "auto":  # the plan decides it from the budget (latentseg.plan.plan_augmentation)
        raise ValueError("data.augmentation is 'auto': plan the config (latentseg.plan) before building transforms")
    augment = config.augmentation == "on"
    if config.flips and augment:
        words = flip_word_pairs(config.text_flip_words, len(patch_size)) if swap_text else {}
        steps += [RandFlipTextd(keys, axis, words.get(axis, []), prob=0.5) for axis in range(len(patch_size))]
    if config.rotation_degrees > 0 and augment:
        angle = math.radians(config.rotation_degrees)
        # in the plane of the first two axes: range_x in 2D, a rotation about the last axis in 3D
        in_plane = {"range_x": angle} if len(patch_size) == 2 else {"range_z": angle}
        steps.append(RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros", **in_plane))
    if config.intensity_augmentation and augment:
        steps += [RandScaleIntensityd("image", factors=0.1, prob=0.3), RandShiftIntensityd("image", 0.1, prob=0.3)]
    if config.noise_augmentation > 0:
        steps.append(RandRangeNoised(config.noise_augmentation, config.noise_probability))
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)
