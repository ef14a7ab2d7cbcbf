"""Images handed over by the graph (ComfyUI IMAGE batches), optionally with a MASK."""

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .dataset import Dataset, Subset, TrainImage
from .images import content_digest


def dataset_from_pixels(pixels: np.ndarray, captions: list[str], masks: np.ndarray | None = None, **subset) -> Dataset:
    """`pixels` uint8 [B, H, W, 3]; `captions` one per image; `masks` float [B, H, W] or [H, W] (1: train)."""
    if len(captions) != len(pixels):
        raise DatasetError(f"{len(captions)} captions for {len(pixels)} images: give one caption per image.")
    per_image = _masks_for(masks, pixels) if masks is not None else [None] * len(pixels)
    images = []
    for index, (image, caption, mask) in enumerate(zip(pixels, captions, per_image)):
        digest = content_digest(np.ascontiguousarray(image).tobytes() + repr(image.shape).encode())
        images.append(TrainImage(f"graph image {index}", caption, image, mask, (image.shape[1], image.shape[0]), digest))
    return Dataset([Subset(subset.pop("name", "graph images"), images, source="graph", **subset)])


def _masks_for(masks: np.ndarray, pixels: np.ndarray) -> list[np.ndarray]:
    masks = masks[None] if masks.ndim == 2 else masks
    if len(masks) not in (1, len(pixels)):
        raise DatasetError(f"{len(masks)} masks for {len(pixels)} images: give one mask, or one per image.")
    if len(masks) == 1:
        masks = np.repeat(masks, len(pixels), axis=0)
    height, width = pixels.shape[1:3]
    out = []
    for mask in masks.astype(np.float32):
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask, "F").resize((width, height), Image.Resampling.BILINEAR))
        out.append(np.clip(mask, 0, 1))
    return out
