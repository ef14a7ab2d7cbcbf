"""The one dataset type every source produces and the trainer consumes."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import load_rgb


@dataclass(frozen=True)
class TrainImage:
    source: str  # a file path, or "graph image N" for images handed over by the graph
    caption: str
    pixels: np.ndarray | None = None  # [H, W, 3] uint8 when the image did not come from a file

    def load(self) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels, "RGB")
        return load_rgb(Path(self.source))


@dataclass(frozen=True)
class SkippedImage:
    source: str
    reason: str


@dataclass
class Dataset:
    images: list[TrainImage]
    skipped: list[SkippedImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> str:
        lines = [f"{len(self.images)} training images, {len(set(i.caption for i in self.images))} distinct captions."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} files:")
            lines.extend(f"  {item.source}: {item.reason}" for item in self.skipped)
        return "\n".join(lines)
