"""Image loading that never takes a run down: every failure becomes an `ImageLoadError` with a reason."""

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused as likely decompression bombs (about 16k x 16k).
MAX_PIXELS = 256_000_000
BACKGROUND = (255, 255, 255)
# EXIF orientations that turn the image by 90 degrees: width and height swap.
SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageProbe:
    size: tuple[int, int]  # (width, height) as displayed, after EXIF orientation
    digest: str  # hash of the file's bytes


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ImageLoadError(Exception):
    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_rgb(path: Path, composite: bool = True) -> Image.Image:
    """Open an image fully, apply its EXIF orientation and return it as RGB.

    Transparency is composited on white (what studios usually train on); with `composite` False the
    colours under the alpha are kept as they are (kohya `alpha_mask`: the alpha weights the loss instead).
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
                return _to_rgb(image, composite)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"corrupt or truncated image ({error})") from None


def probe_image(path: Path) -> ImageProbe:
    """Size and content hash of an image, decoding it once (JPEGs at 1/8 scale) to catch corrupt files.

    Raises ImageLoadError with the reason, like `load_rgb`.
    """
    data = path.read_bytes()
    if not data:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageLoadError(path, f"{width}x{height} is larger than {MAX_PIXELS} pixels")
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
                orientation = image.getexif().get(0x0112, 1)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"corrupt or truncated image ({error})") from None
    size = (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)
    return ImageProbe(size, content_digest(data))


def _to_rgb(image: Image.Image, composite: bool = True) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA") and composite:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
