"""What training will do with a dataset: every image's bucket (or why it has none), repeats per epoch,
and the batches of an epoch. Pure functions of the dataset and settings: the report and the session
share them, so what the report says is what trains."""

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import DatasetError
from .buckets import Assignment, BucketTable, TooSmall
from .dataset import Dataset, SkippedImage, Subset, TrainImage


@dataclass(frozen=True)
class PlannedImage:
    subset: Subset
    image: TrainImage
    assignment: Assignment
    repeats: int  # per epoch, after kohya's balancing of regularization images
    size: tuple[int, int]  # (width, height) of the oriented image


@dataclass
class DatasetPlan:
    items: list[PlannedImage]
    unassigned: list[SkippedImage]
    resolutions: dict[str, tuple[int, int]]  # subset name -> (width, height) its buckets are made for

    def bucket_counts(self) -> Counter:
        """(width, height) -> images with repeats, as kohya logs them."""
        counts = Counter()
        for item in self.items:
            counts[item.assignment.bucket] += item.repeats
        return counts

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(count / batch_size) for count in self.bucket_counts().values())


def plan_dataset(dataset: Dataset, resolution: int) -> DatasetPlan:
    """Assign every image a bucket. `resolution` is the trainer's; a subset may set its own (kohya TOML)."""
    problems, tables, resolutions = [], {}, {}
    for subset in dataset.subsets:
        size = subset.buckets.resolution or (resolution, resolution)
        resolutions[subset.name] = size
        problems.extend(f"subset '{subset.name}' ({subset.source}): {p}" for p in subset.buckets.problems(size))
        problems.extend(f"subset '{subset.name}' ({subset.source}): {p}" for p in subset.captions.problems())
        if subset.repeats < 1:
            problems.append(f"subset '{subset.name}': repeats is {subset.repeats}; use at least 1.")
        tables[id(subset)] = BucketTable(subset.buckets, size)
    if problems:
        raise DatasetError("The dataset's settings cannot be used:\n- " + "\n- ".join(problems))
    placed, unassigned = [], []
    for subset in dataset.subsets:
        for image in subset.images:
            width, height = image.size or image.load().size
            try:
                placed.append((subset, image, tables[id(subset)].assign(width, height), (width, height)))
            except TooSmall as error:
                unassigned.append(SkippedImage(image.source, str(error)))
    repeats = _balanced_repeats([subset for subset, *_ in placed])
    items = [PlannedImage(s, i, a, r, size) for (s, i, a, size), r in zip(placed, repeats)]
    return DatasetPlan(items, unassigned, resolutions)


def _balanced_repeats(subsets: list[Subset]) -> list[int]:
    """Each image's subset repeats; regularization images are repeated (or cut) to match the training
    images with repeats, exactly as kohya's DreamBoothDataset does."""
    repeats = [0 if subset.is_reg else subset.repeats for subset in subsets]
    wanted = sum(repeats)
    reg = [index for index, subset in enumerate(subsets) if subset.is_reg]
    if not reg:
        return repeats
    if not wanted:  # only regularization images: train them as they are
        return [subset.repeats for subset in subsets]
    total, first = 0, True
    while total < wanted:
        for index in reg:
            if first:
                repeats[index] = subsets[index].repeats
                total += repeats[index]
            else:
                repeats[index] += 1
                total += 1
            if total >= wanted:
                break
        first = False
    return repeats


def epoch_batches(plan: DatasetPlan, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch: every item `repeats` times, shuffled within its bucket, cut into batches of one bucket,
    batches shuffled (kohya's bucket shuffle). Indices are into `plan.items`; seeded by `generator`."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(plan.items):
        by_bucket.setdefault(item.assignment.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        order = torch.randperm(len(members), generator=generator).tolist()
        shuffled = [members[i] for i in order]
        batches.extend(shuffled[start:start + batch_size] for start in range(0, len(shuffled), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]
