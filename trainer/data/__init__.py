"""Training data: where images and captions come from, and how they become tensors."""

from .dataset import Dataset, SkippedImage, TrainImage
from .folder import IMAGE_SUFFIXES, MISSING_CAPTION_POLICIES, scan_image_folder
from .images import ImageLoadError, load_rgb
from .transforms import fit_square

__all__ = [
    "Dataset",
    "SkippedImage",
    "TrainImage",
    "IMAGE_SUFFIXES",
    "MISSING_CAPTION_POLICIES",
    "scan_image_folder",
    "ImageLoadError",
    "load_rgb",
    "fit_square",
]
