"""The sampler of a model trained on several annotators, fitted on its validation cases.

How much DDIM's samples spread depends on the trained model, not on the data alone. On BU-BIL
(10 annotators, pairwise IoU 0.764) the same planned sampler, DDIM-10 with eta 1, gave samples of
pairwise IoU 0.797 from a model trained at spacing 4 (benchmarks.uncertainty) and 0.363 from one
trained at full resolution (benchmarks.realdata), where its Dice fell from 0.671 (DDIM-1) to 0.474.
So `train` tries SAMPLER_CANDIDATES on windows of the validation cases and keeps the one whose
samples agree with each other as the annotators agree with each other, without losing Dice
(`choose_sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from latentseg.config import SampleConfig
from latentseg.infer import postprocessed, sample_volume
from latentseg.models import Segmenter
from latentseg.prompts import encode

# (steps, eta), cheapest first: x0's one step (its samples differ by the starting noise alone), then
# DDIM with eta 1 at more steps, whose fresh noise per step spreads the samples further
SAMPLER_CANDIDATES: tuple[tuple[int, float], ...] = ((1, 0.0), (3, 1.0), (5, 1.0), (10, 1.0))
WINDOWS_PER_CASE = 2  # patch-sized windows on the annotators' foreground (and as many anywhere): a
# whole image costs hundreds of windows at full resolution (BU-BIL at 1300 x 1030 with 128^2 patches)


@dataclass
class Window:
    image: np.ndarray  # (C_in, *roi)
    label: np.ndarray  # (*roi) the case's label
    raters: np.ndarray  # (R, *roi) its annotators' masks
    text: str


@dataclass
class SamplerScore:
    steps: int
    eta: float
    dice: float  # foreground Dice of the fused label against the case's label, pooled over windows
    sample_iou: float  # pairwise IoU of the samples, pooled over pairs and windows
    rater_iou: float  # the same for the annotators

    @property
    def spread_gap(self) -> float:
        return abs(self.sample_iou - self.rater_iou)


def fit_windows(samples: Sequence[dict[str, Any]], roi: Sequence[int], seed: int = 0) -> list[Window]:
    """Windows of `roi` voxels (less where the image is smaller) of each case with several
    annotators: up to WINDOWS_PER_CASE centred on random voxels of their foreground (the image
    centre where none drew any), where the samples' spread is measured, and as many at random
    places, where a sampler's false positives far from the cells show (BU-BIL: Dice 0.85-0.88 on
    foreground windows against 0.67-0.70 on the whole validation images)."""
    rng = np.random.default_rng(seed)
    windows = []
    for s in samples:
        raters = s.get("raters")
        if raters is None or len(raters) < 2:
            continue
        shape = raters.shape[1:]
        size = [min(r, n) for r, n in zip(roi, shape, strict=True)]
        centres = _centres(np.argwhere(np.any(raters > 0, axis=0)), shape, rng)
        for centre in centres + [rng.integers(0, shape) for _ in centres]:
            lo = [int(np.clip(c - z // 2, 0, n - z)) for c, z, n in zip(centre, size, shape, strict=True)]
            box = tuple(slice(a, a + z) for a, z in zip(lo, size, strict=True))
            windows.append(Window(np.array(s["image"][(slice(None), *box)]), np.array(s["label"][0][box]),
                                  np.array(raters[(slice(None), *box)]), s.get("text") or ""))  # fmt: skip
    return windows


def _centres(voxels: np.ndarray, shape: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    if not len(voxels):
        return [np.array(shape) // 2]
    return list(voxels[rng.choice(len(voxels), min(WINDOWS_PER_CASE, len(voxels)), replace=False)])


def pair_overlap(masks: Sequence[np.ndarray]) -> np.ndarray:
    """(intersection, union) voxel counts summed over the distinct pairs of binary masks."""
    flat = np.stack([np.asarray(m, bool).ravel() for m in masks]).astype(np.int64)
    inter = flat @ flat.T  # |A and B| for every pair; |A or B| = |A| + |B| - |A and B|
    sizes = np.diag(inter)
    upper = np.triu_indices(len(masks), 1)
    return np.array([inter[upper].sum(), (sizes[:, None] + sizes[None, :] - inter)[upper].sum()])


def pooled_ratio(counts: dict[int, np.ndarray], scale: float = 1.0) -> float:
    """Mean over classes of scale * numerator / denominator (an empty class: 1)."""
    return float(np.mean([scale * n / d if d else 1.0 for n, d in counts.values()]))


def _counts(classes: Sequence[int]) -> dict[int, np.ndarray]:
    return {c: np.zeros(2, np.int64) for c in classes}


def annotator_agreement(windows: Sequence[Window], classes: Sequence[int]) -> float:
    """The annotators' pairwise IoU over `windows`, pooled as `score_sampler` pools the samples'."""
    counts = _counts(classes)
    for w in windows:
        for c in classes:
            counts[c] += pair_overlap([m == c for m in w.raters])
    return pooled_ratio(counts)


@torch.no_grad()
def score_sampler(
    model: Segmenter, windows: Sequence[Window], texts: Sequence[Any], options: SampleConfig, seed: int = 0
) -> tuple[float, float]:
    """(Dice, the samples' pairwise IoU) of `options` on `windows` (with `texts`, their encoded
    sentences), each pooled over the windows (voxel counts summed, so a window nobody drew in
    counts by what the samples put there, as on the whole image) and averaged over the foreground
    classes."""
    classes = range(1, model.config.num_classes)
    dice_counts, sample_counts = _counts(classes), _counts(classes)
    for w, text in zip(windows, texts, strict=True):
        roi = list(w.label.shape)
        mean, _, _, probs = sample_volume(model, torch.from_numpy(w.image), roi, options, seed, text, keep_samples=True)
        fused = postprocessed(mean.numpy().argmax(0).astype(np.uint8), options)
        labels = [p.argmax(0).numpy() for p in probs]
        for c in classes:
            p, r = fused == c, w.label == c
            dice_counts[c] += (np.logical_and(p, r).sum(), p.sum() + r.sum())
            sample_counts[c] += pair_overlap([m == c for m in labels])
    return pooled_ratio(dice_counts, 2.0), pooled_ratio(sample_counts)


def choose_sampler(scores: Sequence[SamplerScore]) -> SamplerScore:
    """The score with the least spread gap plus Dice shortfall (against the best Dice among
    `scores`); ties go to the earlier, cheaper, candidate."""
    best = max(s.dice for s in scores)
    return min(scores, key=lambda s: s.spread_gap + (best - s.dice))


def fit_sampler(
    model: Segmenter, samples: Sequence[dict[str, Any]], roi: Sequence[int], options: SampleConfig, encoder: Any = None
) -> tuple[SamplerScore, list[SamplerScore]] | None:
    """The chosen candidate and every candidate's score, or None without validation cases that
    have several annotators."""
    windows = fit_windows(samples, roi)
    if not windows:
        return None
    device = next(model.parameters()).device
    texts = [encode(encoder, [w.text], device) for w in windows]  # once, not per candidate
    raters = annotator_agreement(windows, range(1, model.config.num_classes))
    scores = []
    for steps, eta in SAMPLER_CANDIDATES:
        candidate = replace(options, steps=steps, eta=eta, temperature=1.0)
        scores.append(SamplerScore(steps, eta, *score_sampler(model, windows, texts, candidate), raters))
    return choose_sampler(scores), scores


def describe(chosen: SamplerScore, scores: Sequence[SamplerScore]) -> str:
    """One log line: the chosen sampler and what each candidate measured."""
    each = "; ".join(
        f"DDIM-{s.steps} eta {s.eta:g}: Dice {s.dice:.3f}, samples' IoU {s.sample_iou:.3f}" for s in scores
    )
    return (
        f"sampling: DDIM-{chosen.steps}, eta {chosen.eta:g} (annotators' pairwise IoU {chosen.rater_iou:.3f} "
        f"on the validation windows; {each}; predict --steps/--eta set another)"
    )
