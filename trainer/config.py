"""Training settings of every method: one versioned dataclass, validated as a whole before any model work."""

from dataclasses import asdict, dataclass, fields

from .adapters import TARGET_PRESETS
from .errors import ConfigError

CONFIG_VERSION = 1


@dataclass
class TrainConfig:
    steps: int = 300
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    targets: str = "transformer"
    save_every: int = 0  # 0: save only at the end (and on cancel)
    version: int = CONFIG_VERSION

    def problems(self) -> list[str]:
        """Every problem at once, each with the value and how to fix it."""
        found = []
        if self.steps < 1:
            found.append(f"steps is {self.steps}: train for at least 1 step (a few hundred is typical).")
        if not 0 < self.learning_rate <= 1:
            found.append(f"learning_rate is {self.learning_rate}: use a value in (0, 1], e.g. 1e-4.")
        if self.rank < 1:
            found.append(f"rank is {self.rank}: use a rank of at least 1 (4-32 is typical).")
        if self.alpha <= 0:
            found.append(f"alpha is {self.alpha}: use a positive alpha (often equal to the rank).")
        if self.batch_size < 1:
            found.append(f"batch_size is {self.batch_size}: use at least 1.")
        if self.resolution < 64 or self.resolution % 64:
            found.append(f"resolution is {self.resolution}: use a multiple of 64, at least 64.")
        if self.targets not in TARGET_PRESETS:
            found.append(f"targets is '{self.targets}': choose one of {', '.join(TARGET_PRESETS)}.")
        if self.save_every < 0:
            found.append(f"save_every is {self.save_every}: use 0 (only at the end) or a positive step count.")
        return found

    def validate(self) -> None:
        if found := self.problems():
            raise ConfigError(found)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Read a saved config; unknown keys from newer versions are ignored, missing ones defaulted."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
