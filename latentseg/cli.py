"""Command line: latentseg train | pretrain-ddpm | predict | evaluate | serve | demo | phantoms | check-dataset."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from latentseg.data.io import DEFAULT_MAX_VOXELS
from latentseg.errors import LatentSegError, LostPeerError, one_line


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63), got {value}")
    return value


def _phantom_size(text: str) -> int:
    value = _positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"must be >= 16 voxels, got {value}")
    return value


def _class_list(text: str) -> list[int]:
    """'none' -> [], '1,3' -> [1, 3]: foreground label values."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected 'none' or label values such as 1,3, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"label values must be >= 1 (0 is background), got {text}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def cmd_train(args: argparse.Namespace) -> None:
    from latentseg.checkpoint import CONFIG_FILE
    from latentseg.config import Config, apply_overrides, load_config
    from latentseg.distributed import world_from_environment
    from latentseg.training import train

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
    model_dir = train(args.data, args.out, config, resume=args.resume, legacy_state=args.legacy_state)
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
    from latentseg.checkpoint import check_model_dir, load_config
    from latentseg.package import model_folder
    from latentseg.prompts import text_input

    model_dir = model_folder(model_dir)
    check_model_dir(model_dir)
    config = load_config(model_dir)
    text_input(config.model).check_names(config.model, prompts)


def sample_overrides(args: argparse.Namespace) -> dict:
    """The sampling settings given on the command line (None: the model's own)."""
    return {
        "steps": args.steps,
        "eta": args.eta,
        "temperature": args.temperature,
        "largest_component": args.largest_component,
        "num_samples": args.samples,
        "sampler": args.sampler,
        "fusion": args.fusion,
        "staged_final_head": args.staged_final_head,
        "staged_middle_steps": args.staged_middle_steps,
    }


def _predict(args: argparse.Namespace, prompt: str | None, output: Path) -> None:
    from latentseg.infer import PredictOptions, predict

    options = PredictOptions(
        seed=args.seed,
        device=args.device,
        prompt=prompt,
        text_file=args.text_file,
        allow_missing_text=args.allow_missing_text,
        resume=args.resume,
        overwrite=args.overwrite,
        max_voxels=args.max_voxels,
        save_samples=args.save_samples,
        num_parts=args.num_parts,
        part_id=args.part_id,
        engine=args.engine,
    )
    written = predict(args.model, args.input, output, sample_overrides(args), options)
    print(f"wrote {len(written)} files to {output}")


def cmd_export(args: argparse.Namespace) -> None:
    from latentseg.package import export_model

    if not (args.onnx or args.out):
        raise LatentSegError("give --out NAME.zip (one model file), --onnx (ONNX graphs), or both")
    if args.onnx:
        from latentseg.onnx_engine import export_onnx

        print(f"ONNX graphs written to {export_onnx(args.model, args.overwrite)}")
    if args.out:
        print(f"model file written to {export_model(args.model, args.out)}")


def cmd_import(args: argparse.Namespace) -> None:
    from latentseg.package import import_model

    print(f"model unpacked to {import_model(args.file, args.out)}")


def cmd_serve(args: argparse.Namespace) -> None:
    from latentseg.serve import serve

    serve(args.model, args.host, args.port, args.device, args.max_upload_mb)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from latentseg.metrics import evaluate, format_table, uncertainty_lines

    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    summary = evaluate(args.pred, args.ref, labels, args.nsd_tolerance, args.out)
    print(format_table(summary))
    for line in uncertainty_lines(summary):
        print(line)
    print(f"summary written to {args.out or Path(args.pred) / 'summary.json'}")


def cmd_robustness(args: argparse.Namespace) -> None:
    from latentseg.robustness import run

    sigmas = [float(v) for v in args.sigmas.split(",")]
    if any(not 0 <= s <= 1 for s in sigmas):
        raise LatentSegError(f"--sigmas must lie in [0, 1] (the images are scaled to [0, 1]), got {args.sigmas}")
    result = run(args.model, args.input, args.ref, args.out, sigmas)
    for point in result["curve"]:
        print(f"sigma {point['sigma']:.2f}: Dice {point['dice']:.3f}")
    print(f"curve written to {Path(args.out) / 'robustness.png'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from latentseg.demo import run_demo

    run_demo(Path(args.out), args.dims, args.overrides)


def cmd_phantoms(args: argparse.Namespace) -> None:
    from latentseg.data.phantoms import write_phantom_dataset

    out = write_phantom_dataset(
        args.out, args.cases, args.dims, args.size, args.seed, args.ambiguous, raters=args.raters
    )
    extra = f", {args.raters} annotations each (raters/)" if args.raters else ""
    print(f"wrote {args.cases} {args.dims}D phantoms to {out}{extra}")


def cmd_check_dataset(args: argparse.Namespace) -> None:
    from latentseg.data.datasets import discover_dataset, load_dataset

    spec = discover_dataset(args.path, args.allow_outside_paths)
    samples, problems = load_dataset(spec, args.max_voxels, keep_images=False)  # the labels are what it plans from
    for line in spec.warnings:
        print(f"warning: {line}")
    if problems:
        raise LatentSegError("\n".join(problems + [f"{args.path}: {len(problems)} problem(s) found"]))
    print(f"{args.path}: {len(samples)} cases, {spec.layout} layout, no problems found")
    from latentseg.config import load_config
    from latentseg.data.datasets import num_classes_of
    from latentseg.data.prepare import check_plan

    classes = max(num_classes_of(spec) or 0, max(int(s["label"].max()) for s in samples) + 1, 2)
    budget = [f"train.max_minutes={args.minutes}"] if args.minutes else []
    print(check_plan(samples, classes, load_config(None, budget)))


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"latentseg: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset folder")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help=(
            "dataset folder (nnU-Net, MSD, images/ + masks/, or images beside X_mask files); "
            "repeat to train on several, sampled equally"
        ),
    )
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="YAML file of settings, or a preset: ldseg, textdiffseg3d, universal, unisegdiff")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument(
        "--legacy-state",
        action="store_true",
        help="--resume from a train_state.pt of latentseg < 0.2 (read with torch.load(weights_only=True))",
    )
    p.add_argument(
        "--mode",
        choices=["ldseg", "textdiff"],
        help="ldseg (default): latent diffusion; textdiff: a head on a frozen DDPM UNet (needs --backbone)",
    )
    p.add_argument("--backbone", help="textdiff: a diffusers UNet2DModel folder, e.g. from pretrain-ddpm")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=500 model.latent_channels=8")
    p.set_defaults(func=cmd_train)


def _add_pretrain_ddpm(sub) -> None:
    p = sub.add_parser("pretrain-ddpm", help="train an unconditional 2D DDPM UNet on images (no labels)")
    p.add_argument("--data", required=True, help="a folder of 2D images, or a dataset root (its images/)")
    p.add_argument("--out", required=True, help="folder for the diffusers UNet2DModel")
    p.add_argument("--size", type=_positive_int, default=256, help="training crop side (multiple of 32)")
    p.add_argument("--spacing", help="resample first, e.g. 2,2 halves a PNG (then train with data.spacing=[2,2])")
    p.add_argument("--steps", type=_positive_int, default=5000)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_pretrain_ddpm)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images with a trained model")
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--input", required=True, help="an image file or a folder of them")
    p.add_argument("--output", required=True, help="folder for the outputs (not the input folder)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        help="DDIM steps (default: the model's: 1, or 2 with eps prediction; 10 if trained on several annotators)",
    )
    p.add_argument("--eta", type=_fraction, help="DDIM eta, 0 deterministic to 1 (default: the model's)")
    p.add_argument(
        "--temperature", type=_positive_float, help="of the probabilities (default: fitted at training; 1: as sampled)"
    )
    p.add_argument(
        "--largest-component",
        type=_class_list,
        help="classes (1 = the first foreground class) whose label keeps only its largest connected "
        "component: 1,3 or none (default: the model's, planned from its training labels)",
    )
    p.add_argument("--samples", type=_positive_int, help="samples per case (default: the model's, 4)")
    p.add_argument("--seed", type=_seed, default=0)
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
    p.add_argument("--max-voxels", type=_positive_int, help="largest image accepted (default: the model's)")
    p.add_argument("--save-samples", action="store_true", help="also write each sample's labels (CASE_sample00, ...)")
    p.add_argument(
        "--engine", choices=["torch", "onnxruntime"], default="torch", help="onnxruntime: the graphs of export --onnx"
    )
    p.add_argument("--num-parts", type=_positive_int, help="split the cases into this many parts (several machines)")
    p.add_argument(
        "--part-id", type=_non_negative_int, help="the part this process does, 0 .. num-parts - 1 (every N-th case)"
    )
    done = p.add_mutually_exclusive_group()
    done.add_argument(
        "--continue", dest="resume", action="store_true", help="skip the cases whose outputs are all present"
    )
    done.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused by default)")
    p.set_defaults(func=cmd_predict)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score predictions against references (summary.json)")
    p.add_argument("--pred", required=True)
    p.add_argument(
        "--ref",
        required=True,
        action="append",
        help="reference labels; repeat for several annotators (one folder each)",
    )
    p.add_argument("--out", help="summary file (default: PRED/summary.json)")
    p.add_argument("--labels", help="comma-separated foreground labels (default: all present)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (pixels for PNG)")
    p.set_defaults(func=cmd_evaluate)


def _add_robustness(sub) -> None:
    p = sub.add_parser("robustness", help="Dice against Gaussian noise on the inputs (003 Fig. 8)")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="images (or a dataset root)")
    p.add_argument("--ref", required=True, help="their reference labels (same names)")
    p.add_argument("--out", required=True, help="folder for robustness.json and robustness.png")
    p.add_argument("--sigmas", default="0,0.05,0.1,0.2", help="noise std on images scaled to [0, 1] (003 Eq. 19)")
    p.set_defaults(func=cmd_robustness)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="pack a model into one .zip file (config, weights, plan, model card)")
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--out", help="the model file to write, NAME.zip (with the ONNX graphs when exported)")
    p.add_argument("--onnx", action="store_true", help="write the ONNX graphs into MODEL/onnx/ (first, with --out)")
    p.add_argument("--overwrite", action="store_true", help="--onnx: replace graphs exported before")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="unpack a model file into a model directory (checksums checked)")
    p.add_argument("file", help="NAME.zip from latentseg export")
    p.add_argument("--out", required=True, help="a new folder for the model")
    p.set_defaults(func=cmd_import)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="phantoms -> train -> predict -> evaluate, no data needed")
    p.add_argument("--out", default="latentseg-demo")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training settings, e.g. train.steps=200")
    p.set_defaults(func=cmd_demo)


def _add_phantoms(sub) -> None:
    p = sub.add_parser("phantoms", help="write a synthetic phantom dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--cases", type=_positive_int, default=20)
    p.add_argument("--size", type=_phantom_size, default=128)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--ambiguous", action="store_true", help="two similar lesions; the text names the target")
    p.add_argument(
        "--raters", type=int, default=0, help="K annotations per case from a known model of disagreement (raters/)"
    )
    p.set_defaults(func=cmd_phantoms)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web page to segment one uploaded case (Gradio)")
    p.add_argument("--model", required=True, help="model directory written by train")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=_positive_float, default=512.0, help="largest accepted upload")
    p.set_defaults(func=cmd_serve)


def _add_check_dataset(sub) -> None:
    p = sub.add_parser("check-dataset", help="report every problem of a dataset folder")
    p.add_argument("path")
    p.add_argument("--max-voxels", type=_positive_int, default=DEFAULT_MAX_VOXELS, help="largest image accepted")
    p.add_argument(
        "--allow-outside-paths", action="store_true", help="accept files that lead out of the dataset folder"
    )
    p.add_argument("--minutes", type=_positive_float, default=None, help="plan as `train train.max_minutes=M` would")
    p.set_defaults(func=cmd_check_dataset)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="latentseg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an internal error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_pretrain_ddpm(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_robustness(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_phantoms(sub)
    _add_serve(sub)
    _add_check_dataset(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every `finally` cleans up as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def os_error_message(err: OSError) -> str:
    """`PATH: what happened` for an OS error (permissions, a missing folder, a full disk, ...)."""
    what = err.strerror or one_line(err)
    if err.errno == errno.ENOSPC:
        what = "no space left on device (nothing was left half-written; free some space and rerun)"
    path = err.filename if err.filename is not None else None
    return f"{path}: {what}" if path else what


def report_internal_error(err: BaseException, debug: bool) -> str:
    """One line for a bug; the trace goes to a log file (and to stderr with --debug)."""
    trace = "".join(traceback.format_exception(err))
    if debug:
        print(trace, file=sys.stderr, end="")
    where = "--debug prints it"
    try:
        fd, path = tempfile.mkstemp(prefix="latentseg-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(trace)
        where = f"full trace in {path}; --debug prints it"
    except OSError:
        pass
    return f"internal error, {type(err).__name__}: {one_line(err)} ({where})"


def command() -> None:
    """The `latentseg` executable: `main`, then exit with its status.

    After a lost training peer the process ends at once (`os._exit`), once the message is out: the
    collective library's threads may still wait on the dead process, and a normal interpreter
    shutdown would wait with them.
    """
    code, error = _run(None)
    if isinstance(error, LostPeerError):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """The `latentseg` command: every failure ends as `latentseg: error: ...` lines and a non-zero exit."""
    return _run(argv)[0]


def _run(argv: list[str] | None) -> tuple[int, BaseException | None]:
    """`main`'s exit status, and the error it reported (None on success)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        args.func(args)
    except LatentSegError as err:
        _print_errors(str(err).splitlines())
        return 2, err
    except Terminated as err:
        _print_errors([])
        print("latentseg: terminated", file=sys.stderr)
        return 143, err
    except KeyboardInterrupt as err:
        _print_errors([])
        print("latentseg: interrupted", file=sys.stderr)
        return 130, err
    except OSError as err:
        _print_errors([os_error_message(err)])
        return 1, err
    except Exception as err:  # noqa: BLE001 (a bug still gets one line)
        _print_errors([report_internal_error(err, args.debug)])
        return 1, err
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0, None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _print_errors(lines: list[str]) -> None:
    from latentseg.progress import close_all

    close_all()
    for line in lines:  # one line per problem
        print(f"latentseg: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
