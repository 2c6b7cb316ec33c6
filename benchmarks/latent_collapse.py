"""How much of the mask a trained model's label latent holds (issue 17: why the samples are alike).

For each model folder, on its own training cases (preprocessed as `train` does, one patch-size crop
centred on the foreground per case), with no gradient:
- `empty_gap`: |z(mask) - z(empty mask)| / |z(mask)|, the label encoder's latent of a case's mask
  against that of an empty mask (0: the latent ignores the mask, it has collapsed);
- `between_cases`: the same between two cases' masks;
- `decoder_flip`: the share of voxels whose decoded label changes when the decoder is given the
  empty mask's latent instead of the case's own, with the same image (0: the decoder ignores the
  latent, so no sampled latent can change the mask);
- `alone_dice`: foreground Dice of the latent decoded with the image side zeroed (models with skips);
- `last_diff`: the diffusion loss at the end of training (training_log.json).

    python -m benchmarks.latent_collapse --data ../shared/data/bubil_cells MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice

from latentseg.api import load_model
from latentseg.data.prepare import prepare_training_data


def centre_crop(array: np.ndarray, label: np.ndarray, size: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A crop of `size` (padded with zeros where the image is smaller) centred on the foreground."""
    spatial = label.shape[1:]
    fg = np.argwhere(label[0] > 0)
    centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(spatial) // 2
    out_image = np.zeros((array.shape[0], *size), array.dtype)
    out_label = np.zeros((1, *size), label.dtype)
    src, dst = [], []
    for c, n, s in zip(centre, spatial, size, strict=True):
        start = int(np.clip(c - s // 2, 0, max(n - s, 0)))
        length = min(s, n)
        src.append(slice(start, start + length))
        dst.append(slice(0, length))
    out_image[(slice(None), *dst)] = array[(slice(None), *src)]
    out_label[(slice(None), *dst)] = label[(slice(None), *src)]
    return out_image, out_label


def foreground_dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean foreground Dice of (B, *S) label maps against (B, 1, *S) labels (MONAI's compute_dice)."""
    return float(compute_dice((pred > 0)[:, None].float(), (label > 0).float(), include_background=True).mean())


@torch.no_grad()
def measure(folder: Path, data: Path, cases: int) -> dict:
    model = load_model(folder, device="cpu")
    net = model.network.eval()
    config = copy.deepcopy(model.config)
    prepared = prepare_training_data([data], config)
    samples = [s for s in prepared.train if s["label"].max() > 0][:cases]
    size = list(model.config.data.patch_size)
    crops = [centre_crop(s["image"], s["label"], size) for s in samples]
    images = torch.from_numpy(np.stack([c[0] for c in crops])).float()
    labels = torch.from_numpy(np.stack([c[1] for c in crops])).long()
    z = net.encode_label(labels)
    z_empty = net.encode_label(torch.zeros_like(labels))
    flat = z.flatten(1)
    empty_gap = ((z - z_empty).flatten(1).norm(dim=1) / flat.norm(dim=1)).mean()
    between = ((z - z.roll(1, 0)).flatten(1).norm(dim=1) / flat.norm(dim=1)).mean()
    cond = net.conditioning(images)
    own, other = net.decode(z, cond).argmax(1), net.decode(z_empty, cond).argmax(1)
    result = {
        "model": str(folder),
        "cases": len(samples),
        "empty_gap": round(float(empty_gap), 4),
        "between_cases": round(float(between), 4),
        "decoder_flip": round(float((own != other).float().mean()), 4),
        "own_latent_dice": round(foreground_dice(own, labels), 4),
    }
    if getattr(net, "skips", False):
        alone = net.decode_latent_alone(z, cond).argmax(1)
        result["alone_dice"] = round(foreground_dice(alone, labels), 4)
    log = json.loads((folder / "training_log.json").read_text())
    result["last_diff"] = log["diff"][-1] if log.get("diff") else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the dataset the models were trained on")
    parser.add_argument("--cases", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for folder in args.models:
        print(json.dumps(measure(folder, args.data, args.cases)), flush=True)


if __name__ == "__main__":
    main()
