"""The on-disk cache of DreamBooth class images a host's model generated.

One folder per generation setting (prompt, negative prompt, sampler settings, size, seed and the model's
identity), named by their hash: `<root>/<hash>/class_00000.png ...` and `settings.json`. Image i is always
sampled with seed + i, so a cache is reused across runs and topped up with exactly the images a bigger
first run would have made.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import Dataset, TrainImage, probe_image
from .files import atomic_write

SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class ClassImageSettings:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    width: int
    height: int
    model: str  # identity of the weights that sample and decode (changes with any weight or patch)

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class ClassImageCache:
    def __init__(self, root: Path, settings: ClassImageSettings):
        self.settings = settings
        self.folder = root / settings.key()

    def path(self, index: int) -> Path:
        return self.folder / f"class_{index:05d}.png"

    def seed(self, index: int) -> int:
        return self.settings.seed + index

    def missing(self, count: int) -> list[int]:
        """Indices below `count` without an image yet (a cancelled run leaves a gap-free prefix)."""
        return [index for index in range(count) if not self.path(index).is_file()]

    def store(self, index: int, pixels: np.ndarray) -> Path:
        """Write image `index` ([H, W, 3] uint8) atomically, with the settings beside it."""
        if not (self.folder / SETTINGS_FILE).is_file():
            text = json.dumps(asdict(self.settings), indent=2, sort_keys=True)
            atomic_write(self.folder / SETTINGS_FILE, lambda temp: temp.write_text(text, encoding="utf-8"))
        return atomic_write(self.path(index), lambda temp: Image.fromarray(pixels, "RGB").save(temp, format="PNG"))

    def dataset(self, count: int) -> Dataset:
        """The first `count` class images, captioned with the class prompt, as a regularization subset."""
        images = []
        for index in range(count):
            path = self.path(index)
            probe = probe_image(path)
            images.append(TrainImage(str(path), self.settings.prompt, size=probe.size, digest=probe.digest))
        return Dataset.from_images(images, name="class images", is_reg=True, class_tokens=self.settings.prompt,
                                   source=str(self.folder))
