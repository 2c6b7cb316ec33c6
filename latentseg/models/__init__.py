"""Networks. `LatentSegmenter` composes the LDSeg model for 2D and 3D; `TextDiffSegmenter` is
TextDiff (001) on a frozen DDPM UNet; `build_model` picks one by `config.mode`."""

from torch import nn

from latentseg.config import ModelConfig
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import ImageEncoder, LabelDecoder, LabelEncoder, standardize
from latentseg.models.segmenter import LatentSegmenter, Losses

MODES = ("ldseg", "textdiff")


def build_model(config: ModelConfig) -> nn.Module:
    """The model `config.mode` names, with freshly initialised weights."""
    if config.mode == "textdiff":
        from latentseg.models.textdiff import TextDiffSegmenter

        return TextDiffSegmenter(config)
    if config.mode != "ldseg":
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    return LatentSegmenter(config)


__all__ = [
    "MODES",
    "Denoiser",
    "ImageEncoder",
    "LabelDecoder",
    "LabelEncoder",
    "LatentSegmenter",
    "Losses",
    "build_model",
    "standardize",
]
