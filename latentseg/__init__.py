"""latentseg: medical image segmentation with latent diffusion models, for 2D and 3D images.

The public API, for notebooks and scripts (the `latentseg` command does the same from a shell):

    import latentseg
    model = latentseg.load_model("runs/model")
    prediction = model.predict("case.nii.gz", num_samples=4)  # .label, .probabilities, .uncertainty

The names are imported on first use, so that `latentseg --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "Config": "latentseg.config",
    "SampleConfig": "latentseg.config",
    "load_config": "latentseg.config",
    "LatentSegError": "latentseg.errors",
    "Model": "latentseg.api",
    "load_model": "latentseg.api",
    "Prediction": "latentseg.infer",
    "PredictOptions": "latentseg.infer",
    "predict": "latentseg.infer",
    "train": "latentseg.training",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latentseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
