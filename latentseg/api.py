"""The notebook API: `load_model(folder).predict(image)` segments an array or a file the way
`latentseg predict` does, and `train(data, out, Config())` trains as `latentseg train` does."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentseg import checkpoint
from latentseg.config import Config
from latentseg.data.datasets import Case
from latentseg.data.io import ImageMeta, read_image
from latentseg.errors import LatentSegError
from latentseg.infer import Prediction, predict_image, preprocessing_of, resolve_device, sample_options
from latentseg.models import Segmenter
from latentseg.package import model_folder
from latentseg.prompts import text_input


@dataclass
class Model:
    """A trained model, ready to segment."""

    network: Segmenter
    config: Config  # finished: config.json with plans.json applied
    fingerprint: dict[str, Any]

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.fingerprint.get("labels", {}).items()}

    def predict(
        self,
        image: np.ndarray | str | Path,
        spacing: tuple[float, ...] | None = None,
        prompt: str | None = None,
        seed: int = 0,
        **sample: Any,
    ) -> Prediction:
        """Segment one image: a file (NIfTI, PNG, ...) or an array of shape (*S) or (C, *S) with
        its `spacing` (default 1 per axis). `sample` overrides the model's sampling settings
        (steps, num_samples, sampler, fusion, ...); `prompt` is the sentence or target of text and
        prompted models. The result is on the image's own grid."""
        array, meta = _as_image(image, spacing, self.config.model.spatial_dims)
        options = sample_options(self.network, self.config.sample, sample)
        device = next(self.network.parameters()).device
        request = {"prompt": prompt, "text_file": None, "allow_missing_text": False}
        case = Case("image", [meta.path])
        text = text_input(self.config.model).prediction_inputs(self.config.model, [case], request, device)
        prep = preprocessing_of(self.fingerprint, self.config)
        return predict_image(self.network, self.config, prep, array, meta, options, seed, text.get("image"))

    def to(self, device: str | torch.device) -> Model:
        return replace(self, network=self.network.to(resolve_device(str(device))))


def load_model(path: str | Path, device: str = "auto") -> Model:
    """The model a `latentseg train` folder holds (on CUDA when present, with `device="auto"`)."""
    network, config, fingerprint = checkpoint.load_model(model_folder(path), resolve_device(device))
    return Model(network, config, fingerprint)


def _as_image(image: np.ndarray | str | Path, spacing, dims: int) -> tuple[np.ndarray, ImageMeta]:
    if isinstance(image, (str, Path)):
        return read_image(image)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == dims:
        array = array[None]
    if array.ndim != dims + 1:
        raise LatentSegError(f"an array of shape {array.shape} for a {dims}D model: give (*S) or (C, *S)")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * dims))
    affine = np.diag([*spacing, 1.0]) if dims == 3 else None
    kind = "nifti" if dims == 3 else "image2d"
    return array, ImageMeta(Path("array"), kind, tuple(array.shape[1:]), spacing, affine)
