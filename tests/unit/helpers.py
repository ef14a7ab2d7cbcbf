"""Small builders shared by the core tests."""

from pathlib import Path

import numpy as np
from PIL import Image

from tunekit.trainer.config import TrainConfig
from tunekit.trainer.data import Dataset, TrainImage
from tunekit.trainer.session import TrainSession

from fakes import FakeBridge


def solid_images(count: int = 4, size: int = 64) -> list[np.ndarray]:
    """A learnable set: saturated colours, a little different each."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        colour = np.array([220, 30, 40]) + rng.integers(-10, 10, 3)
        images.append(np.broadcast_to(colour, (size, size, 3)).astype(np.uint8).copy())
    return images


def solid_dataset(count: int = 4) -> Dataset:
    return Dataset.from_images([TrainImage(f"graph image {i}", "tkred square", pixels) for i, pixels in enumerate(solid_images(count))])


def make_session(run_dir: Path | None = None, bridge: FakeBridge | None = None, parallel=None, **overrides) -> TrainSession:
    settings = dict(steps=40, learning_rate=5e-3, rank=4, alpha=4, resolution=64, seed=3)
    settings.update(overrides)
    return TrainSession(bridge or FakeBridge(), solid_dataset(), TrainConfig(**settings), run_dir, parallel=parallel)


def write_png(path: Path, colour=(200, 20, 20), mode="RGB", size=(32, 32)) -> Path:
    Image.new(mode, size, colour).save(path)
    return path
