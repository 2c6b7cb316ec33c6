"""Markdown tables from benchmarks/results/*.json, for benchmarks/README.md.

Run: python -m benchmarks.report            (print every table)
     python -m benchmarks.report --readme   (rewrite the blocks between <!-- table:NAME -->
                                             and <!-- /table --> in benchmarks/README.md)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEP_KEYS = [
    ("ddim1", "1"),
    ("ddim2", "2"),
    ("ddim5", "5"),
    ("ddim10", "10"),
    ("ddim50", "50"),
    ("ddpm1000", "DDPM 1000"),
]


def _f(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def core_tables(r: dict) -> str:
    rows = [
        "| variant | " + " | ".join(label for _, label in STEP_KEYS) + " | label AE ceiling | train s |",
        "|---" * (len(STEP_KEYS) + 3) + "|",
    ]
    for name, sweep in r["dice_vs_steps"].items():
        cells = [_f(sweep[k]["foreground"]) if k in sweep else "" for k, _ in STEP_KEYS]
        ceiling = r.get("label_autoencoder_ceiling", {}).get(name, {}).get("foreground")
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_f(ceiling)} | {r['training'][name]['seconds']:.0f} |")
    if "restandardize_x0" in r:
        re = r["restandardize_x0"]
        rows.append(
            "| x0 + re-standardize | | "
            + " | ".join(_f(re[k]["foreground"]) if k in re else "" for k, _ in STEP_KEYS[1:])
            + " | | |"
        )
    table = "\n".join(rows)
    if "unet" in r:
        u = r["unet"]
        table += (
            f"\n\nMONAI UNet trained for the same {u['train_seconds']:.0f} s ({u['steps']} steps): "
            f"mean foreground Dice {_f(u['foreground'])}."
        )
    t = r["timing"]
    timing = [
        "| input | UNet s | latentseg DDIM-2, 1 sample | ratio | 4 samples | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for v in t.values():
        s = v["seconds"]
        timing.append(
            f"| {'x'.join(map(str, v['input']))} | {s['unet']:.4f} | {s['latentseg_ddim2_1sample']:.4f} | "
            f"{v['ratio_1sample_vs_unet']:.2f} | {s['latentseg_ddim2_4samples']:.4f} | "
            f"{v['ratio_4samples_vs_unet']:.2f} |"
        )
    return table + "\n\n" + "\n".join(timing)


def _runs(r: dict, skip: str = "", ordered: bool = False):
    """(dataset, method, result) of every run in a results file whose top level is keyed by dataset;
    `skip` is a top-level key that is not a dataset."""
    for name, methods in r.items():
        if name != skip:
            for method, v in sorted(methods.items()) if ordered else methods.items():
                yield name, method, v


def realdata_table(r: dict) -> str:
    rows = [
        "| dataset | method | minutes | steps | mean fg Dice | per-class Dice | NSD | HD95 | s/case | finished (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, v in _runs(r, skip="machine"):
        if "summary" not in v:  # the plain script reports its own Dice only
            classes = " / ".join(_f(c) for c in v.get("dice_per_class") or [])
            seconds = v["raw"].get("infer_s_per_case", 0.0)
            rows.append(f"| {name} | {method} | {v['budget_minutes']:g} | {v['steps']} | {_f(v['dice'])} | "
                        f"{classes} | | | {seconds:.2f} | {v.get('finished', '')} |")  # fmt: skip
            continue
        fg, per = v["summary"]["foreground_mean"], v["summary"]["mean"]
        classes = " / ".join(_f(c["Dice"]) for c in per.values())
        rows.append(
            f"| {name} | {method} | {v['budget_minutes']:g} | {v['steps']} | {_f(fg['Dice'])} | {classes} | "
            f"{_f(fg['NSD'])} | {_f(fg['HD95'], 1)} | {v['inference_seconds_per_case']:.2f} | "
            f"{v.get('finished', '')} |"
        )
    return "\n".join(rows)


def uncertainty_table(r: dict) -> str:
    rows = [
        "| dataset | method | steps | Dice | GED² | HM-IoU | QUBIQ Dice | samples' pairwise IoU (raters') | ECE | "
        "AUROC entropy, whole / band | s/case | finished (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, v in _runs(r, skip="raters", ordered=True):
        m, c = v["multirater"], v.get("calibration") or {}
        pairs = f"{_f(m.get('sample_pairwise_IoU'))} ({_f(m.get('rater_pairwise_IoU'))})"
        auroc = f"{_f(c.get('AUROC_entropy'))} / {_f(c.get('AUROC_entropy_boundary'))}"
        agreement = " | ".join(_f(m.get(k)) for k in ("GED", "HM_IoU", "QUBIQ_Dice"))
        when = v.get("finished", "")[11:16]
        rows.append(f"| {name} | {method} | {v['steps']} | {_f(v['dice'])} | {agreement} | {pairs} | "
                    f"{_f(c.get('ECE'))} | {auroc} | {v['seconds_per_case']:.2f} | {when} |")  # fmt: skip
    return "\n".join(rows)


def pipeline_table(r: dict) -> str:
    rows = ["| dataset | variant | steps | Dice | per-class Dice | finished |", "|---|---|---|---|---|---|"]
    for name, variant, v in _runs(r):
        per = v.get("dice_per_class") or []
        per = per.values() if isinstance(per, dict) else per
        rows.append(f"| {name} | {variant} | {v['steps']} | {_f(v['dice'])} | {' / '.join(_f(x) for x in per)} | "
                    f"{v.get('finished', '')} |")  # fmt: skip
    return "\n".join(rows)


def inference_table(r: dict) -> str:
    rows = ["| case | engine, samples | seconds per case | x UNet |", "|---|---|---|---|"]
    for name, v in r.items():
        if not isinstance(v, dict) or "seconds_per_case" not in v:
            continue
        for key, seconds in v["seconds_per_case"].items():
            rows.append(f"| {name} | {key} | {seconds:.3f} | {v['ratio_to_unet'][key]:.2f} |")
    folder = r.get("folder_2d_256")
    if folder:
        total, network = folder["total_seconds"], folder["network_seconds"]
        rows.append(f"| folder of {folder['cases']} 2D cases | predict, total / network | {total:.1f} / {network:.1f} "
                    f"| {folder['ratio']:.2f} (total / network) |")  # fmt: skip
    return "\n".join(rows)


def robustness_table(r: dict) -> str:
    rows = ["| dataset | method | Dice at sigma 0 / 0.05 / 0.1 / 0.2 | Dice lost at 0.2 |", "|---|---|---|---|"]
    for name, method, v in _runs(r):
        curve = " / ".join(_f(p["dice"]) for p in v["curve"])
        rows.append(f"| {name} | {method} | {curve} | {_f(v.get('dice_loss_at_0.2'))} |")
    return "\n".join(rows)


def staged_table(r: dict) -> str:
    rows = [
        "| dataset | method | sampling | mean fg Dice | NSD | network calls | latents evaluated | plateau epoch | "
        "epochs trained | s/case |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, v in _runs(r, skip="machine"):
        for label, e in v["evaluations"].items():
            rows.append(
                f"| {name} | {method} | {label} | {_f(e['dice'])} | {_f(e['nsd'])} | {e['network_calls']} | "
                f"{e['latent_evaluations']} | {_f(v['plateau_epoch'], 1)} | {v['epochs']:.1f} | "
                f"{e['seconds_per_case']:.2f} |"
            )
    return "\n".join(rows)


def text_table(r: dict) -> str:
    rows = [
        "| dataset | variant | minutes | steps | mean fg Dice | per-class Dice | NSD |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, variants in r.items():
        if name == "machine":
            continue
        for variant, v in variants.items():
            for e in v["evaluations"].values():
                classes = " / ".join(_f(d) for d in e["dice_per_class"].values())
                rows.append(
                    f"| {name} | {variant} | {v['train_minutes']:.1f} | {v['steps']} | {_f(e['dice'])} | {classes} | "
                    f"{_f(e['nsd'])} |"
                )
    return "\n".join(rows)


def ddp_table(r: dict) -> str:
    rows = ["| run | processes x threads | batch per process | images / s | x one process |", "|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        rows.append(
            f"| {name} | {v['processes']} x {v['threads_per_process']} | {v['batch_per_process']} | "
            f"{v['images_per_second']:.1f} | {v['ratio_to_one_process']:.2f} |"
        )
    return "\n".join(rows)


def textdiff_table(r: dict) -> str:
    rows = [
        "| method | seeds | training steps (mean) | Dice (mean +- std) | IoU (mean +- std) |",
        "|---|---|---|---|---|",
    ]
    for name, v in r.get("summary", {}).items():
        steps = [r[s][name]["steps"] for s in r if s.startswith("seed") and name in r[s]]
        rows.append(
            f"| {name} | {v['seeds']} | {sum(steps) / len(steps):.0f} | {v['dice']:.3f} +- {v['dice_std']:.3f} | "
            f"{v['iou']:.3f} +- {v['iou_std']:.3f} |"
        )
    return "\n".join(rows)


def universal_table(r: dict) -> str:
    rows = [
        "| model | minutes | steps | " + " | ".join(f"Dice {t}" for t in TARGET_ORDER) + " | mean |",
        "|---|---|---|" + "---|" * (len(TARGET_ORDER) + 1),
    ]
    for name, v in r.get("runs", {}).items():
        cells = [_f(v["dice"][t]) if t in v["dice"] else "" for t in TARGET_ORDER]
        mean = sum(v["dice"].values()) / len(v["dice"])
        minutes = f"{v['minutes']:.0f}" if v["minutes"] else "(steps)"  # --steps: a step budget, no clock
        rows.append(f"| {name} | {minutes} | {v['steps']} | " + " | ".join(cells) + f" | {_f(mean)} |")
    return "\n".join(rows)


TARGET_ORDER = ("organ", "lesion", "cell interior")

TABLES = {
    "core": core_tables,
    "realdata": realdata_table,
    "staged": staged_table,
    "text": text_table,
    "ddp": ddp_table,
    "textdiff": textdiff_table,
    "universal": universal_table,
    "uncertainty": uncertainty_table,
    "pipeline": pipeline_table,
    "inference": inference_table,
    "robustness": robustness_table,
}


def rendered() -> dict[str, str]:
    return {
        name: render(json.loads((RESULTS / f"{name}.json").read_text()))
        for name, render in TABLES.items()
        if (RESULTS / f"{name}.json").is_file()
    }


def update_readme(path: Path) -> list[str]:
    """Replace each marked table block; returns the names replaced."""
    text, done = path.read_text(), []
    for name, table in rendered().items():
        # the block's body never crosses its own end marker, so an empty block stays one block
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:(?!<!-- /table -->).)*?(<!-- /table -->)", re.S)
        text, n = pattern.subn(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
        if n:
            done.append(name)
    path.write_text(text)
    return done


def main() -> None:
    if sys.argv[1:] == ["--readme"]:  # the tables live in benchmarks/README.md, any in the README too
        for readme in (RESULTS.parent / "README.md", RESULTS.parent.parent / "README.md"):
            print(f"{readme}: updated", ", ".join(update_readme(readme)) or "nothing")
        return
    for name, table in rendered().items():
        print(f"### {name}\n\n{table}\n")


if __name__ == "__main__":
    main()
