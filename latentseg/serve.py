"""`latentseg serve`: a local web page (Gradio) to try a model on one case without code.

Upload a PNG / JPEG image or a NIfTI volume, pick the prompt when the model takes one, choose the
sampling steps, samples and fusion, and see the mask over the image, the uncertainty map, the
area or volume of each class and, for 3D, any slice. The label map downloads in the input's
format with the input's geometry (it is what `latentseg predict` writes for the same seed).

Safety: the server binds to 127.0.0.1 unless told otherwise; uploads are copied into a private
temporary folder, segmented there and the folder deleted; only the upload Gradio itself stored is
read (a path from anywhere else is refused), and every file name on the server is chosen here,
never taken from the client.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentseg.checkpoint import FINGERPRINT_FILE, check_model_dir, load_config, read_fingerprint
from latentseg.config import concrete_sampling
from latentseg.data.io import output_name, read_image, read_label, split_suffix
from latentseg.errors import LatentSegError
from latentseg.fusion import FUSIONS
from latentseg.infer import PredictOptions, predict
from latentseg.overlay import colour_panels, display_slice
from latentseg.package import model_folder

log = logging.getLogger("latentseg.serve")
ACCEPTED = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz", ".mha", ".nrrd")  # one file each


@dataclass
class Result:
    """What one segmentation shows: the arrays to draw and the label file to download."""

    image: np.ndarray  # (C, *S) raw intensities
    label: np.ndarray  # (*S) class ids
    uncertainty: np.ndarray  # (*S) the samples' standard deviation, as written (PNG: scaled)
    spacing: tuple[float, ...]
    download: Path
    class_names: dict[int, str]

    @property
    def is_3d(self) -> bool:
        return self.label.ndim == 3


def upload_root() -> Path:
    """Where Gradio stores uploads (its cache); nothing outside it is ever opened."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def checked_upload(path: str | Path | None, max_bytes: int, root: Path | None = None) -> tuple[Path, str]:
    """The uploaded file and its image suffix, or a clear error."""
    if not path:
        raise LatentSegError("upload an image (PNG, JPEG, TIFF) or a volume (NIfTI, MetaImage, NRRD) first")
    path = Path(path).resolve()
    root = (root or upload_root()).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise LatentSegError("only files uploaded through this page can be segmented")
    _, suffix = split_suffix(path)
    if suffix.lower() not in ACCEPTED:
        raise LatentSegError(f"{path.name}: not a 2D image, NIfTI, MetaImage or NRRD file ({', '.join(ACCEPTED)})")
    size = path.stat().st_size
    if size > max_bytes:
        raise LatentSegError(
            f"{path.name}: {size / 2**20:.1f} MB is over this server's limit of {max_bytes / 2**20:.0f} MB"
        )
    return path, suffix.lower()


def safe_stem(name: str) -> str:
    """A download name from the client's file name: letters, digits, '-' and '_' only."""
    stem = split_suffix(Path(name))[0]
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem).strip("_")
    return cleaned[:64] or "case"


def segment_file(
    model_dir: Path,
    upload: str | Path | None,
    downloads: Path,
    prompt: str | None = None,
    sample: dict | None = None,
    seed: int = 0,
    device: str = "auto",
    max_bytes: int = 512 * 2**20,
    upload_folder: Path | None = None,
) -> Result:
    """Segment one uploaded file exactly as `latentseg predict` would; raises LatentSegError.
    `sample` overrides the model's sampling settings (steps, num_samples, fusion, ...)."""
    source, suffix = checked_upload(upload, max_bytes, upload_folder)
    with tempfile.TemporaryDirectory(prefix="latentseg-serve-") as work:
        inputs, outputs = Path(work) / "input", Path(work) / "output"
        inputs.mkdir()
        name = f"case{suffix}"  # our name, not the client's
        shutil.copyfile(source, inputs / name)
        try:
            options = PredictOptions(seed=seed, device=device, overlays=False, progress=True, prompt=prompt)
            predict(model_dir, inputs, outputs, sample, options)
        except LatentSegError as err:  # name the upload, not the server's temporary path
            raise LatentSegError(str(err).replace(str(inputs / name), source.name)) from None
        image, meta = read_image(inputs / name)
        written = output_name(meta, "case")  # a JPEG or TIFF's label map is a PNG, an .mha's an .mha
        label, _ = read_label(outputs / written)
        uncertainty, _ = read_image(outputs / output_name(meta, "case", "_std"))
        downloads.mkdir(parents=True, exist_ok=True)
        download = (
            Path(tempfile.mkdtemp(dir=downloads))
            / f"{safe_stem(Path(source).name)}_label{split_suffix(Path(written))[1]}"
        )
        shutil.copyfile(outputs / written, download)
    fingerprint = read_fingerprint(model_dir / FINGERPRINT_FILE)
    names = {int(k): str(v) for k, v in (fingerprint.get("labels") or {}).items()}
    return Result(image, label, uncertainty[0], tuple(meta.spacing), download, names)


def render(result: Result, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(overlay, heat map) as (H, W, 3) uint8 pictures; for 3D, slice `index` of the last axis."""
    image, label, unc = display_slice(result.image, result.label, result.uncertainty, index)
    _, overlay, heat = colour_panels(image, label, unc)
    return overlay, heat


def class_sizes(result: Result) -> list[list[Any]]:
    """Rows of (class, voxels, area in mm^2 or volume in mm^3) for every predicted class."""
    unit = float(np.prod(result.spacing))
    rows = []
    for value, count in zip(*np.unique(result.label, return_counts=True), strict=True):
        if value == 0:
            continue
        name = result.class_names.get(int(value), str(int(value)))
        rows.append([name, int(count), round(count * unit, 2)])
    return rows


def _segment_handler(gr, model_dir: Path, downloads: Path, device: str, max_bytes: int):
    """The Segment button: one upload in, the page's outputs out; never lets an error escape."""

    def run(upload, prompt, steps, samples, fusion, seed, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        empty = (None, None, None, gr.update(visible=False), None)
        sample = {"steps": int(steps), "num_samples": int(samples), "fusion": fusion}
        try:
            result = segment_file(model_dir, upload, downloads, prompt or None, sample, int(seed), device, max_bytes)
        except LatentSegError as err:
            return (*empty, f"**Could not segment this file.** {err}", None)
        except Exception as err:  # keep serving whatever one request did
            log.exception("segmentation failed")
            return (*empty, f"**Segmentation failed:** {type(err).__name__}: {err}", None)
        overlay, heat = render(result)
        depth = result.label.shape[-1] if result.is_3d else 1
        slider = gr.update(visible=result.is_3d, minimum=0, maximum=max(depth - 1, 1), value=depth // 2, step=1)
        sizes = class_sizes(result) or [["(nothing found)", 0, 0.0]]
        return overlay, heat, sizes, slider, str(result.download), "Done.", result

    return run


def _reslice(result, index):
    if result is None:
        return None, None
    return render(result, index)


PROMPT_LABELS = {"text": "Target (any words)", "none": "Description of the case"}


def _prompt_box(gr, m):
    """A dropdown of the model's targets (class prompts), or a text box (text prompts, descriptions)."""
    if m.prompt == "class":
        return gr.Dropdown(m.prompt_names, value=m.prompt_names[0], label="Target", elem_id="prompt")
    return gr.Textbox(label=PROMPT_LABELS[m.prompt], visible=m.text_fusion != "none", elem_id="prompt")


def _inputs(gr, config) -> list:
    m, s = config.model, concrete_sampling(config.sample)
    upload = gr.File(
        label="Image (PNG, JPEG, TIFF) or volume (NIfTI, MHA, NRRD)", file_types=list(ACCEPTED), elem_id="upload"
    )
    prompt = _prompt_box(gr, m)
    steps = gr.Slider(1, 50, value=s.steps, step=1, label="Sampling steps")
    samples = gr.Slider(1, 20, value=s.num_samples, step=1, label="Samples")
    fusion = gr.Radio(list(FUSIONS), value=s.fusion, label="Fusion")
    seed = gr.Number(value=0, precision=0, label="Seed")
    return [upload, prompt, steps, samples, fusion, seed]


def _outputs(gr, config) -> list:
    size_unit = "mm³" if config.model.spatial_dims == 3 else "mm²"
    message = gr.Markdown(elem_id="message")
    overlay = gr.Image(label="Mask over the image", elem_id="overlay", format="png")
    heat = gr.Image(label="Uncertainty (standard deviation of the samples)", elem_id="uncertainty")
    slice_index = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice")
    sizes = gr.Dataframe(headers=["class", "voxels", size_unit], label="Size of each class")
    download = gr.File(label="Label map (input's format and geometry)", elem_id="download")
    return [overlay, heat, sizes, slice_index, download, message]


def build_app(model_dir: str | Path, device: str = "auto", max_upload_mb: float = 512.0):
    """The Gradio page for one model."""
    try:
        import gradio as gr
    except ImportError as err:
        raise LatentSegError("latentseg serve needs Gradio: pip install 'latentseg[serve]'") from err

    model_dir = model_folder(model_dir)
    check_model_dir(model_dir)
    config = load_config(model_dir)
    downloads = Path(tempfile.mkdtemp(prefix="latentseg-downloads-"))
    run = _segment_handler(gr, model_dir, downloads, device, int(max_upload_mb * 2**20))
    with gr.Blocks(title="latentseg", delete_cache=(600, 3600)) as app:
        gr.Markdown(f"# latentseg\nModel: `{model_dir.name}` ({config.model.spatial_dims}D, {config.model.mode})")
        with gr.Row():
            with gr.Column():
                inputs = _inputs(gr, config)
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                outputs = _outputs(gr, config)
        state = gr.State()
        button.click(run, inputs, [*outputs, state])
        slice_index = outputs[3]
        slice_index.change(_reslice, [state, slice_index], outputs[:2])
    app.downloads_folder = downloads
    return app


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    max_upload_mb: float = 512.0,
) -> None:
    """Start the page and block until interrupted."""
    app = build_app(model_dir, device, max_upload_mb)
    try:
        app.queue().launch(
            server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20), show_error=True
        )
    finally:
        shutil.rmtree(app.downloads_folder, ignore_errors=True)
