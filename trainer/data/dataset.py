"""The one dataset type every source produces and the trainer consumes.

A `Dataset` is a list of `Subset`s (kohya's word): images that share repeats, class tokens, caption
options, crop/flip augmentation, bucket settings and the `is_reg` flag.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .buckets import BucketSettings
from .captions import CaptionOptions
from .images import load_rgb

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class TrainImage:
    source: str  # a file path, or "graph image N" for images handed over by the graph
    caption: str
    pixels: np.ndarray | None = None  # [H, W, 3] uint8 when the image did not come from a file
    mask: np.ndarray | None = None  # [H, W] float32 loss weights in 0..1 (1: train, 0: ignore)
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation; read when None
    digest: str = ""  # content hash of the file (or pixels): the latent cache key, duplicate finder

    def load(self, composite: bool = True) -> Image.Image:
        """RGB; transparency composited on white unless `composite` is False (alpha_mask subsets)."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels, "RGB")
        return load_rgb(Path(self.source), composite)

    @property
    def name(self) -> str:
        return Path(self.source).name if self.pixels is None else self.source


@dataclass(frozen=True)
class SkippedImage:
    source: str
    reason: str


@dataclass(frozen=True)
class Augment:
    """Per-subset image augmentation (kohya `random_crop`, `flip_aug`, `resize_interpolation`)."""

    random_crop: bool = False
    flip: bool = False
    interpolation: str | None = None  # None: kohya's default (area to shrink, lanczos to enlarge)
    alpha_mask: bool = False  # the image's alpha channel weights the loss (1: train, 0: ignore)

    @property
    def cacheable(self) -> bool:
        """Latents can be encoded once: the crop never changes (a flip is cached as a second latent)."""
        return not self.random_crop


@dataclass
class Subset:
    name: str
    images: list[TrainImage]
    repeats: int = 1
    class_tokens: str = ""  # kohya: the caption of an image that has no caption file
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    augment: Augment = field(default_factory=Augment)
    buckets: BucketSettings = field(default_factory=BucketSettings)
    is_reg: bool = False
    loss_weight: float = 1.0  # kohya `prior_loss_weight` for is_reg subsets
    source: str = ""  # where it came from: a folder, "file.toml:12", "graph"
    caption_extension: str = ".txt"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    subsets: list[Subset]
    skipped: list[SkippedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # unsupported settings, duplicates: shown in every report

    @classmethod
    def from_images(cls, images: list[TrainImage], skipped: list[SkippedImage] | None = None, **subset) -> "Dataset":
        return cls([Subset(subset.pop("name", "images"), images, **subset)], list(skipped or []))

    @property
    def images(self) -> list[TrainImage]:
        return [image for subset in self.subsets for image in subset.images]

    def __len__(self) -> int:
        return sum(len(subset) for subset in self.subsets)

    def merged(self, other: "Dataset") -> "Dataset":
        return Dataset(self.subsets + other.subsets, self.skipped + other.skipped, self.notes + other.notes)

    def with_subsets(self, **changes) -> "Dataset":
        """The same images with every subset's settings changed, e.g. `repeats=2`."""
        return Dataset([replace(subset, **changes) for subset in self.subsets], self.skipped, self.notes)

    def summary(self) -> str:
        images = self.images
        lines = [f"{len(images)} training images, {len(set(i.caption for i in images))} distinct captions."]
        if len(self.subsets) > 1:
            lines.extend(
                f"  subset {s.name}: {len(s)} images x {s.repeats} repeats{' (regularization)' if s.is_reg else ''}"
                for s in self.subsets
            )
        lines.extend(f"Note: {note}" for note in self.notes)
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} files:")
            lines.extend(f"  {item.source}: {item.reason}" for item in self.skipped)
        return "\n".join(lines)
