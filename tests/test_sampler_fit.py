"""The multi-annotator sampler fitted on validation windows (`latentseg.sampler_fit`)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from latentseg.config import SampleConfig
from latentseg.sampler_fit import (
    SAMPLER_CANDIDATES,
    WINDOWS_PER_CASE,
    SamplerScore,
    choose_sampler,
    fit_sampler,
    fit_windows,
    pair_overlap,
    pooled_ratio,
)


def _square(shape, top, left, size=8):
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = 1
    return mask


def _case(shape=(40, 48), shifts=(0, 1, 2, 3), top=10, left=12):
    raters = np.stack([_square(shape, top, left + s) for s in shifts])
    return {"image": np.zeros((1, *shape), np.float32), "label": raters[:1].copy(), "raters": raters, "text": ""}


def test_windows_cover_the_annotators_foreground_and_skip_single_annotator_cases():
    cases = [_case(), _case(top=25, left=30), {**_case(), "raters": _case()["raters"][:1]}, {**_case(), "raters": None}]
    windows = fit_windows(cases, [16, 16])
    assert len(windows) == 2 * 2 * WINDOWS_PER_CASE  # one annotator, or none: nothing to fit the spread to
    assert all(w.image.shape == (1, 16, 16) and w.raters.shape == (4, 16, 16) for w in windows)
    assert all(w.label.shape == (16, 16) for w in windows)
    on_foreground = windows[:WINDOWS_PER_CASE] + windows[2 * WINDOWS_PER_CASE : 3 * WINDOWS_PER_CASE]
    assert all(w.raters.any() for w in on_foreground)  # centred on a voxel some annotator drew
    anywhere = fit_windows([_case(shape=(200, 200))] * 10, [16, 16])
    assert sum(not w.raters.any() for w in anywhere) >= 5  # and the others fall anywhere, mostly on background
    small = fit_windows([_case(shape=(12, 48), top=2)], [16, 16])
    assert small[0].raters.shape == (4, 12, 16)  # never larger than the image
    empty = {**_case(), "raters": np.zeros((3, 40, 48), np.uint8)}
    assert len(fit_windows([empty], [16, 16])) == 2  # nobody drew anything: the image centre, and one anywhere


def test_pair_overlaps_by_hand_and_against_the_mean_pairwise_iou():
    a, b = _square((20, 20), 0, 0, 4), _square((20, 20), 0, 2, 4)  # 16 voxels each, 8 shared
    assert pair_overlap([a, b]).tolist() == [8, 24]
    assert pair_overlap([a, a, b]).tolist() == [16 + 8 + 8, 16 + 24 + 24]
    rng = np.random.default_rng(0)
    masks = [rng.random((30, 30)) < 0.3 for _ in range(5)]
    inter, union = pair_overlap(masks)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert inter == sum(np.logical_and(masks[i], masks[j]).sum() for i, j in pairs)
    assert union == sum(np.logical_or(masks[i], masks[j]).sum() for i, j in pairs)
    assert pooled_ratio({1: np.array([8, 24]), 2: np.array([0, 0])}) == pytest.approx((8 / 24 + 1) / 2)


def test_the_pooled_dice_is_monais_on_one_window():
    pred = _square((20, 20), 0, 0, 4) + 2 * _square((20, 20), 10, 10, 3)
    ref = _square((20, 20), 0, 2, 4) + 2 * _square((20, 20), 11, 10, 3)
    onehot = lambda m: torch.nn.functional.one_hot(torch.tensor(m, dtype=torch.long), 3).movedim(-1, 0)[None]  # noqa: E731
    oracle = compute_dice(onehot(pred), onehot(ref), include_background=False)
    overlap = lambda p, r: np.array([np.logical_and(p, r).sum(), p.sum() + r.sum()])  # noqa: E731
    counts = {c: overlap(pred == c, ref == c) for c in (1, 2)}
    assert pooled_ratio(counts, 2.0) == pytest.approx(float(oracle.mean()))


def test_the_choice_weighs_the_spread_gap_against_lost_dice():
    tight = SamplerScore(1, 0.0, dice=0.80, sample_iou=0.95, rater_iou=0.75)
    matched = SamplerScore(10, 1.0, dice=0.78, sample_iou=0.76, rater_iou=0.75)
    wild = SamplerScore(5, 1.0, dice=0.50, sample_iou=0.74, rater_iou=0.75)
    assert choose_sampler([tight, matched, wild]) is matched  # gap 0.01 + 0.02 lost, against 0.20 and 0.31
    assert choose_sampler([tight, wild]) is tight  # matching the spread by losing 0.3 Dice does not pay
    same = SamplerScore(3, 1.0, dice=0.80, sample_iou=0.95, rater_iou=0.75)
    assert choose_sampler([tight, same]) is tight  # a tie goes to the cheaper, earlier candidate


class ShiftingSampler(torch.nn.Module):
    """Samples of a square shifted by (sample index x spread[steps]) voxels: how far a sampler's
    samples spread is set by its step count, as the fit must find."""

    def __init__(self, spread: dict[int, int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(num_classes=2)
        self.spread = spread

    def sample(self, window, options, text, generator):
        b, shape = window.shape[0], window.shape[2:]
        found = np.argwhere(window[0, 0].numpy() > 0.5)
        top, left = found.min(0) if len(found) else (0, 0)
        masks = [_square(tuple(shape), top, left + n * self.spread[options.steps]) for n in range(options.num_samples)]
        fg = torch.tensor(np.stack(masks), dtype=torch.float32)[:, None, None].expand(-1, b, 1, *shape)
        return torch.cat([1 - fg, fg], dim=2)  # (N, b, C, *roi)


def test_the_fit_keeps_the_sampler_whose_samples_spread_as_the_annotators():
    cases = []
    for k in range(3):
        case = _case(top=8 + 4 * k)
        case["image"] = case["label"].astype(np.float32)  # the model reads the square's place from the image
        cases.append(case)
    options = SampleConfig(steps=10, eta=1.0, num_samples=4)
    model = ShiftingSampler({1: 0, 3: 1, 5: 3, 10: 6})  # the annotators shift by 0-3 voxels: one voxel apart
    chosen, scores = fit_sampler(model, cases, [24, 24], options)
    assert [(s.steps, s.eta) for s in scores] == list(SAMPLER_CANDIDATES)
    assert (chosen.steps, chosen.eta) == (3, 1.0)
    assert scores[0].sample_iou == 1.0 and scores[-1].sample_iou < scores[1].sample_iou
    assert chosen.spread_gap == min(s.spread_gap for s in scores) < 0.05  # both one voxel apart per step
    assert fit_sampler(model, [{**c, "raters": None} for c in cases], [24, 24], options) is None
