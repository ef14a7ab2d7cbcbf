"""Turn a loaded image into the fixed-size pixels the VAE encodes."""

import numpy as np
from PIL import Image

from ..host import SizeInfo


def fit_square(image: Image.Image, resolution: int) -> tuple[np.ndarray, SizeInfo]:
    """Resize so the short side is `resolution`, then centre-crop a square.

    Returns float32 pixels [H, W, 3] in 0..1 and the size facts SDXL conditions on.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    resized_w, resized_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    left, top = (resized_w - resolution) // 2, (resized_h - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(cropped, dtype=np.float32) / 255.0
    return pixels, SizeInfo(original=(height, width), crop_top_left=(top, left), target=(resolution, resolution))
