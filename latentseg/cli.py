"""Command line: latentseg train | pretrain-ddpm | predict | evaluate | serve | demo | phantoms | check-dataset."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from latentseg.errors import LatentSegError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from latentseg.checkpoint import CONFIG_FILE
    from latentseg.config import Config, apply_overrides, load_config
    from latentseg.distributed import world_from_environment
    from latentseg.train import train

    if args.resume:  # the saved run's settings; only train.* may change (e.g. more steps)
        config = Config.load(Path(args.out) / CONFIG_FILE)
        fixed = [item for item in args.overrides if not item.startswith("train.")]
        if fixed:
            raise LatentSegError(f"only train.* settings can change when resuming, got {', '.join(fixed)}")
        apply_overrides(config, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        if args.mode:
            config.model.mode = args.mode
        if args.backbone:
            config.model.backbone = args.backbone
    model_dir = train(args.data, args.out, config, resume=args.resume)
    if world_from_environment().is_main:  # under torchrun, one line for the run rather than one per process
        print(f"model written to {model_dir}")


def cmd_pretrain_ddpm(args: argparse.Namespace) -> None:
    from latentseg.pretrain import pretrain_ddpm

    spacing = [float(v) for v in args.spacing.split(",")] if args.spacing else None
    out = pretrain_ddpm(
        args.data,
        args.out,
        args.size,
        args.steps,
        args.batch_size,
        args.lr,
        args.minutes,
        args.seed,
        args.device,
        spacing=spacing,
    )
    print(f"DDPM UNet written to {out} (use it with: latentseg train --mode textdiff --backbone {out} ...)")


def prompt_folder(prompt: str) -> str:
    """A folder name for one prompt's outputs: 'left ventricle' -> 'left_ventricle'."""
    return "_".join("".join(ch if ch.isalnum() else " " for ch in prompt).split()) or "prompt"


def cmd_predict(args: argparse.Namespace) -> None:
    if args.prompts is not None:  # one folder of outputs per target
        if args.prompt is not None:
            raise LatentSegError("give --prompt or --prompts, not both")
        prompts = [p.strip() for p in args.prompts.split(",")]
        if not all(prompts):
            raise LatentSegError(f"--prompts has an empty name: {args.prompts!r}")
        _check_class_prompts(Path(args.model), prompts)  # before any output is written
        for prompt in prompts:
            _predict(args, prompt, Path(args.output) / prompt_folder(prompt))
        return
    _predict(args, args.prompt, Path(args.output))


def _check_class_prompts(model_dir: Path, prompts: list[str]) -> None:
    from latentseg.checkpoint import CONFIG_FILE, check_model_dir
    from latentseg.config import Config
    from latentseg.data.targets import ClassIds

    check_model_dir(model_dir)
    config = Config.load(model_dir / CONFIG_FILE)
    if config.model.prompt == "class":
        ClassIds(config.model.prompt_names).encode(prompts)


def _predict(args: argparse.Namespace, prompt: str | None, output: Path) -> None:
    from latentseg.infer import predict

    written = predict(
        args.model,
        args.input,
        output,
        args.steps,
        args.samples,
        args.seed,
        args.device,
        fusion=args.fusion,
        sampler=args.sampler,
        prompt=prompt,
        text_file=args.text_file,
        allow_missing_text=args.allow_missing_text,
        staged_final_head=args.staged_final_head,
        staged_middle_steps=args.staged_middle_steps,
    )
    print(f"wrote {len(written)} files to {output}")


def cmd_serve(args: argparse.Namespace) -> None:
    from latentseg.serve import serve

    serve(args.model, args.host, args.port, args.device, args.max_upload_mb)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from latentseg.metrics import evaluate, format_table

    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    summary = evaluate(args.pred, args.ref, labels, args.nsd_tolerance, args.out)
    print(format_table(summary))
    print(f"summary written to {args.out or Path(args.pred) / 'summary.json'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from latentseg.demo import run_demo

    run_demo(Path(args.out), args.dims, args.overrides)


def cmd_phantoms(args: argparse.Namespace) -> None:
    from latentseg.data.phantoms import write_phantom_dataset

    out = write_phantom_dataset(args.out, args.cases, args.dims, args.size, args.seed, args.ambiguous)
    print(f"wrote {args.cases} {args.dims}D phantoms to {out}")


def cmd_check_dataset(args: argparse.Namespace) -> None:
    from latentseg.data.datasets import discover_dataset, load_dataset

    spec = discover_dataset(args.path)
    samples, problems = load_dataset(spec)
    for line in spec.warnings:
        print(f"warning: {line}")
    if problems:
        raise LatentSegError("\n".join(problems + [f"{args.path}: {len(problems)} problem(s) found"]))
    print(f"{args.path}: {len(samples)} cases, {spec.layout} layout, no problems found")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a dataset folder")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="dataset folder (nnU-Net, MSD, or images/ + masks/); repeat to train on several, sampled equally",
    )
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="YAML file of settings, or a preset: ldseg, textdiffseg3d, universal, unisegdiff")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument(
        "--mode",
        choices=["ldseg", "textdiff"],
        help="ldseg (default): latent diffusion; textdiff: a head on a frozen DDPM UNet (needs --backbone)",
    )
    p.add_argument("--backbone", help="textdiff: a diffusers UNet2DModel folder, e.g. from pretrain-ddpm")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=500 model.latent_channels=8")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-ddpm", help="train an unconditional 2D DDPM UNet on images (no labels)")
    p.add_argument("--data", required=True, help="a folder of 2D images, or a dataset root (its images/)")
    p.add_argument("--out", required=True, help="folder for the diffusers UNet2DModel")
    p.add_argument("--size", type=_positive_int, default=256, help="training crop side (multiple of 32)")
    p.add_argument("--spacing", help="resample first, e.g. 2,2 halves a PNG (then train with data.spacing=[2,2])")
    p.add_argument("--steps", type=_positive_int, default=5000)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_pretrain_ddpm)

    p = sub.add_parser("predict", help="segment images with a trained model")
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--input", required=True, help="an image file or a folder of them")
    p.add_argument("--output", required=True, help="folder for the outputs (not the input folder)")
    p.add_argument("--steps", type=_positive_int, help="DDIM steps (default: the model's, 2)")
    p.add_argument("--samples", type=_positive_int, help="samples per case (default: the model's, 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--fusion", choices=["mean", "vote", "staple"], help="how samples become one mask (default: the model's, mean)"
    )
    p.add_argument(
        "--sampler",
        choices=["ddim", "staged"],
        help="ddim (--steps K) or staged (UniSegDiff: 12 network calls; two-head models only)",
    )
    p.add_argument(
        "--staged-final-head",
        choices=["eps", "x0"],
        help="staged: the head of the last step (004: eps; x0 where the eps head is the weaker one)",
    )
    p.add_argument(
        "--staged-middle-steps",
        type=int,
        help="staged: DDIM steps between the thresholds with each head (004: 10, so 12 network calls; 9 gives 11)",
    )
    p.add_argument(
        "--prompt", help="text models: what to segment, for every input (e.g. 'the lesion in the upper left')"
    )
    p.add_argument(
        "--prompts", help="prompted models: several targets, e.g. 'left ventricle,myocardium' (a folder each)"
    )
    p.add_argument("--text-file", help="text models: a CSV filename,text with one sentence per input")
    p.add_argument("--allow-missing-text", action="store_true", help="inputs without a sentence get 'no description'")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score predictions against references (summary.json)")
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--out", help="summary file (default: PRED/summary.json)")
    p.add_argument("--labels", help="comma-separated foreground labels (default: all present)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (pixels for PNG)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="phantoms -> train -> predict -> evaluate, no data needed")
    p.add_argument("--out", default="latentseg-demo")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training settings, e.g. train.steps=200")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("phantoms", help="write a synthetic phantom dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--cases", type=_positive_int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ambiguous", action="store_true", help="two similar lesions; the text names the target")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("serve", help="a local web page to segment one uploaded case (Gradio)")
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-dataset", help="report every problem of a dataset folder")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except LatentSegError as err:
        for line in str(err).splitlines():  # one line per problem
            print(f"latentseg: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
