"""Turn a loaded image into the pixels the VAE encodes: resize to cover its bucket, crop, flip."""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..host import SizeInfo
from .buckets import Assignment

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Crop:
    """Where the bucket sits in the resized image, and whether it is mirrored."""

    top: int
    left: int
    flip: bool = False


def centre_crop(assignment: Assignment, flip: bool = False) -> Crop:
    (bucket_w, bucket_h), (resized_w, resized_h) = assignment.bucket, assignment.resized
    return Crop((resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2, flip)


def random_crop(assignment: Assignment, rng: random.Random, flip: bool = False) -> Crop:
    """kohya's `random.randint(0, trim)` on each side that is longer than the bucket."""
    (bucket_w, bucket_h), (resized_w, resized_h) = assignment.bucket, assignment.resized
    return Crop(rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w), flip)


def resize_filter(name: str | None, source: tuple[int, int], target: tuple[int, int]) -> Image.Resampling:
    """kohya's default (no resize_interpolation): area when shrinking, lanczos when enlarging."""
    if name:
        return FILTERS[name]
    shrinking = target[0] * target[1] < source[0] * source[1]
    return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS


def crop_to_bucket(
    image: Image.Image, assignment: Assignment, crop: Crop, interpolation: str | None = None
) -> tuple[np.ndarray, SizeInfo]:
    """Float32 pixels [h, w, 3] in 0..1 of the bucket, and the SDXL size facts of this very crop.

    SizeInfo.crop_top_left is the real offset of the crop in the resized image (mirrored with the flip);
    kohya records a centred value even for random crops.
    """
    cropped = _geometry(image, assignment, crop, interpolation)
    pixels = np.asarray(cropped, dtype=np.float32) / 255.0
    bucket_w, bucket_h = assignment.bucket
    left = assignment.resized[0] - crop.left - bucket_w if crop.flip else crop.left
    return pixels, SizeInfo(original=(image.height, image.width), crop_top_left=(crop.top, left), target=(bucket_h, bucket_w))


def crop_mask(mask: np.ndarray, assignment: Assignment, crop: Crop) -> np.ndarray:
    """The same geometry for a float mask [H, W] (bilinear)."""
    picture = Image.fromarray(np.clip(mask, 0, 1).astype(np.float32), "F")
    return np.asarray(_geometry(picture, assignment, crop, "bilinear"), dtype=np.float32)


def _geometry(image: Image.Image, assignment: Assignment, crop: Crop, interpolation: str | None) -> Image.Image:
    (bucket_w, bucket_h), resized = assignment.bucket, assignment.resized
    if image.size != resized:
        image = image.resize(resized, resize_filter(interpolation, image.size, resized))
    image = image.crop((crop.left, crop.top, crop.left + bucket_w, crop.top + bucket_h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else image


def fit_square(image: Image.Image, resolution: int) -> tuple[np.ndarray, SizeInfo]:
    """Resize so the short side is `resolution`, then centre-crop a square (no buckets)."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    assignment = Assignment((resolution, resolution), resized, 0.0)
    return crop_to_bucket(image, assignment, centre_crop(assignment), "lanczos")
