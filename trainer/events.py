"""What the core tells its host while it trains. Frozen, so hosts can queue them freely."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    path: Path
    step: int
    partial: bool


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a skipped image, a resumed run), not an error."""

    message: str


@dataclass(frozen=True)
class ValidationLoss:
    """Mean loss on held-out images at fixed noise and timesteps (trainer/monitor.py)."""

    step: int
    loss: float
    images: int
    train_loss: float | None  # mean training loss since the previous validation


@dataclass(frozen=True)
class SamplesSaved:
    step: int
    paths: tuple[Path, ...]


Event = StepDone | CheckpointSaved | Notice | ValidationLoss | SamplesSaved
