"""Errors of the conversion tools: each says what is wrong, the value, and how to fix it."""

from ..errors import TuneKitError, UnsupportedModelError


class ConversionError(TuneKitError):
    """A file cannot be converted as asked (bad input, a format that cannot hold it, a mismatch)."""


class UnknownArchitectureError(UnsupportedModelError, ConversionError):
    """Neither the metadata, the key names nor the tensor shapes say which model family a file is for."""


class UnsafeCheckpointError(ConversionError):
    """A pickle (.ckpt) that needs code to load: refused, never executed."""
