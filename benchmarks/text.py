"""Text-guided segmentation benchmark (issue "Text-guided and prompted universal segmentation",
000 Table II), each variant trained for the same wall-clock minutes on the same split:

- ambiguous phantoms (2D, 200 training / 20 test): two similar lesions per organ, and only the
  sentence ("the lesion in the upper left of the organ") says which one is labelled;
- MoNuSeg with its per-image sentences (`text_annotations.csv`), its own split.

Variants (000 Table II): `text_fusion` none (the text-free model), attention (000 Eq. 2) and concat
(zeta_1); with attention, image_downsample (zeta_2: `model.image_encoder=downsample`) and
label_downsample (zeta_3: `model.label_encoder=downsample`). Training flips swap the sentence's
side words (`data.text_flip_words`), so a flipped sample's sentence stays true. Dice and NSD (mean foreground and per
class; on phantoms class 2 is the target lesion) from `latentseg evaluate`. Writes
benchmarks/results/text.json.
Run: python -m benchmarks.text [--datasets ambiguous,monuseg] [--variants none,attention,concat,...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.runs import collect, phantom_data, real_data, train_and_score

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "text"
RESULTS = ROOT / "results" / "text.json"
MINUTES = {"ambiguous": 5.0, "monuseg": 6.0}
EVALUATIONS = [("ddim2", {"steps": 2, "num_samples": 4})]
VARIANTS = {
    "none": ["model.text_fusion=none"],
    "attention": ["model.text_fusion=attention"],
    "concat": ["model.text_fusion=concat"],
    "image_downsample": ["model.text_fusion=attention", "model.image_encoder=downsample"],
    "label_downsample": ["model.text_fusion=attention", "model.label_encoder=downsample"],
}


def run(dataset: str, variant: str, minutes: float) -> dict:
    work = WORK / dataset
    data = phantom_data(work, ambiguous=True) if dataset == "ambiguous" else real_data(dataset, work)
    return train_and_score(work / variant, data, VARIANTS[variant], EVALUATIONS, minutes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="ambiguous,monuseg")
    parser.add_argument("--variants", default="none,attention,concat")
    parser.add_argument("--minutes", type=float, default=0.0, help="per variant (default: 5 phantoms, 6 MoNuSeg)")
    args = parser.parse_args()
    for dataset in args.datasets.split(","):
        for variant in args.variants.split(","):
            minutes = args.minutes or MINUTES[dataset]
            print(f"== {dataset} / {variant}: {minutes} minutes", flush=True)
            run(dataset, variant, minutes)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results = collect(WORK, RESULTS)
    for dataset, variants in previous.items():  # runs made earlier (their work folders may be gone)
        if dataset != "machine":
            for variant, result in variants.items():
                results.setdefault(dataset, {}).setdefault(variant, result)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
