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


Event = StepDone | CheckpointSaved | Notice
