"""Small previews of dataset images, cached on disk by the image's path, size and mtime (an edited image
gets a new one; old ones are never read again)."""

import hashlib
from pathlib import Path

from PIL import Image, ImageOps

from ..files import atomic_write
from .images import BACKGROUND, MAX_PIXELS, ImageLoadError

SIZES = (128, 192, 256, 384, 512)
QUALITY = 80


def thumbnail(image: Path, cache_dir: Path, size: int = 256) -> Path:
    """A WebP no larger than `size` x `size` of `image` (EXIF orientation applied), made once and cached.
    Raises ImageLoadError for an image that cannot be read."""
    if size not in SIZES:
        raise ValueError(f"Thumbnail size {size} is not one of {SIZES}.")
    stat = image.stat()
    key = hashlib.blake2b(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}".encode(), digest_size=16)
    cached = cache_dir / key.hexdigest()[:2] / f"{key.hexdigest()}.webp"
    if not cached.is_file():
        preview = _preview(image, size)
        atomic_write(cached, lambda temp: preview.save(temp, format="WEBP", quality=QUALITY))
    return cached


def _preview(path: Path, size: int) -> Image.Image:
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageLoadError(path, f"{image.width}x{image.height} is larger than {MAX_PIXELS} pixels")
            image.draft("RGB", (size, size))  # JPEGs decode at 1/2..1/8 scale: most of the time saved
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                flat = Image.new("RGB", image.size, BACKGROUND)
                flat.paste(image, mask=image.getchannel("A"))
                return flat
            return image.convert("RGB")
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, f"not an image PIL can read ({error})") from None
