"""Model families: declarative facts, looked up by name. Adding one is a new module + one entry."""

from .base import Family
from .sd1 import SD1
from .sdxl import SDXL
from ..errors import UnsupportedModelError

FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SDXL)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        supported = ", ".join(family.title for family in FAMILIES.values())
        raise UnsupportedModelError(
            f"TuneKit cannot train a LoRA on this model yet: it is a '{name}' model. "
            f"Supported families: {supported}. Load a checkpoint of a supported family."
        ) from None


__all__ = ["Family", "FAMILIES", "get_family", "SD1", "SDXL"]
