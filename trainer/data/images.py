"""Image loading that never takes a run down: every failure becomes an `ImageLoadError` with a reason."""

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused as likely decompression bombs (about 16k x 16k).
MAX_PIXELS = 256_000_000
BACKGROUND = (255, 255, 255)


class ImageLoadError(Exception):
    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_rgb(path: Path) -> Image.Image:
    """Open an image fully, apply its EXIF orientation and return it as RGB.

    Transparency is composited on white (what studios usually train on).
    """
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageLoadError(path, f"{image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"corrupt or truncated image ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
