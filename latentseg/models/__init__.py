"""Networks. `LatentSegmenter` composes the LDSeg model for 2D and 3D."""

from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import ImageEncoder, LabelDecoder, LabelEncoder, standardize
from latentseg.models.segmenter import LatentSegmenter, Losses

__all__ = ["Denoiser", "ImageEncoder", "LabelDecoder", "LabelEncoder", "LatentSegmenter", "Losses", "standardize"]
