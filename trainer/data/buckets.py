"""Aspect-ratio buckets, as kohya sd-scripts makes and assigns them (`make_bucket_resolutions`,
`BucketManager.select_bucket`), so a kohya user's images land in the same buckets.

Where TuneKit differs on purpose:
- Sizes are read after EXIF orientation (kohya reads the stored size and trains a phone photo sideways).
- With `no_upscale`, an image smaller than one bucket step on a side gets a 0-pixel bucket in kohya and
  crashes the run; TuneKit reports it ("smaller than the bucket step") and trains the rest.
- Without buckets kohya resizes to cover `resolution` and centre-crops: so does TuneKit.
- Unset `min_reso`/`max_reso` default to kohya's 256/1024, widened to include `resolution` (kohya
  refuses a resolution outside them; TuneKit trains tiny models at 64).
- Buckets are keyed by their size only: subsets of different kohya datasets that share a bucket size may
  share a batch (kohya keeps datasets apart). The latents have the same shape, so nothing changes but order.
"""

import math
from dataclasses import dataclass

KOHYA_MIN_RESO, KOHYA_MAX_RESO, KOHYA_STEPS = 256, 1024, 64


@dataclass(frozen=True)
class BucketSettings:
    """kohya's dataset keys: enable_bucket, resolution, min/max_bucket_reso, bucket_reso_steps, bucket_no_upscale.

    `resolution` None: the trainer's resolution. `enabled` False: one square-ish bucket of `resolution`.
    """

    enabled: bool = True
    resolution: tuple[int, int] | None = None  # (width, height)
    min_reso: int | None = None
    max_reso: int | None = None
    steps: int = KOHYA_STEPS
    no_upscale: bool = False

    def problems(self, resolution: tuple[int, int]) -> list[str]:
        found = []
        if self.steps < 8 or self.steps % 8:
            found.append(f"bucket_reso_steps is {self.steps}: use a multiple of 8 (64 is kohya's default).")
        if min(resolution) < 8:
            found.append(f"resolution is {resolution}: use at least 64.")
        if not self.enabled or self.no_upscale:
            return found
        low, high = self.limits(resolution)
        if low > min(resolution):
            found.append(f"min_bucket_reso {low} is larger than the resolution {resolution}: lower it.")
        if high < max(resolution):
            found.append(f"max_bucket_reso {high} is smaller than the resolution {resolution}: raise it.")
        return found

    def limits(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """min/max bucket side, rounded to the step as kohya's `adjust_min_max_bucket_reso_by_steps` does."""
        low = self.min_reso if self.min_reso is not None else min(KOHYA_MIN_RESO, min(resolution))
        high = self.max_reso if self.max_reso is not None else max(KOHYA_MAX_RESO, max(resolution))
        low -= low % self.steps
        if high % self.steps:
            high += self.steps - high % self.steps
        return low, high


@dataclass(frozen=True)
class Assignment:
    bucket: tuple[int, int]  # (width, height) trained at
    resized: tuple[int, int]  # (width, height) the image is resized to before the crop
    ar_error: float  # bucket aspect ratio - image aspect ratio


class TooSmall(ValueError):
    pass


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64):
    """kohya `library/model_util.py` `make_bucket_resolutions`, line for line: sorted (width, height)."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class BucketTable:
    """Assigns (width, height) images to buckets for one BucketSettings at one resolution."""

    def __init__(self, settings: BucketSettings, resolution: tuple[int, int]):
        self.settings, self.resolution = settings, resolution
        self.max_area = resolution[0] * resolution[1]
        if not settings.enabled:
            self.predefined = [resolution]
        elif settings.no_upscale:
            self.predefined = []  # buckets follow the images
        else:
            low, high = settings.limits(resolution)
            self.predefined = make_bucket_resolutions(resolution, low, high, settings.steps)
        self._predefined_set = set(self.predefined)
        self._ratios = [w / h for w, h in self.predefined]

    def assign(self, width: int, height: int) -> Assignment:
        if self.settings.enabled and self.settings.no_upscale:
            return self._assign_no_upscale(width, height)
        aspect = width / height
        bucket = (width, height)
        if bucket not in self._predefined_set:
            errors = [abs(ratio - aspect) for ratio in self._ratios]
            bucket = self.predefined[errors.index(min(errors))]  # numpy argmin: the first smallest
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return Assignment(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _assign_no_upscale(self, width: int, height: int) -> Assignment:
        aspect, steps = width / height, self.settings.steps
        if width * height > self.max_area:
            resized_width = math.sqrt(self.max_area * aspect)
            resized_height = self.max_area / resized_width
            w_rounded = self._round(resized_width)
            h_in_w = self._round(w_rounded / aspect)
            h_rounded = self._round(resized_height)
            w_in_h = self._round(h_rounded * aspect)
            if h_in_w and h_rounded and abs(w_rounded / h_in_w - aspect) < abs(w_in_h / h_rounded - aspect):
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if not bucket[0] or not bucket[1]:
            raise TooSmall(
                f"{width}x{height} is smaller than the bucket step {steps} on a side (bucket_no_upscale keeps it "
                "that small): upscale it, or turn bucket_no_upscale off"
            )
        return Assignment(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _round(self, value: float) -> int:
        value = int(value + 0.5)
        return value - value % self.settings.steps
