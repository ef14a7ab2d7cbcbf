"""Errors the core raises for the user: each says what is wrong, the value, and how to fix it."""


class TuneKitError(Exception):
    """Base of every error meant to be shown to a user as is."""


class ConfigError(TuneKitError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid training settings:\n- " + "\n- ".join(problems))


class DatasetError(TuneKitError):
    pass


class UnsupportedModelError(TuneKitError):
    pass


class TrainingDivergedError(TuneKitError):
    pass


class SaveError(TuneKitError):
    """A training state could not be written; the message names it, the free space and the state kept."""
