"""What TuneKit made of a dataset, for people: text stats and a preview grid of items as they will train."""

import math
import statistics
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .captions import split_tags
from .dataset import Dataset
from .plan import DatasetPlan, plan_dataset
from .transforms import centre_crop, crop_to_bucket

UPSCALE_WARNING = 2.0  # report images enlarged more than this


def dataset_report(dataset: Dataset, resolution: int, batch_size: int, plan: DatasetPlan | None = None) -> str:
    plan = plan or plan_dataset(dataset, resolution)
    lines = [f"{len(dataset)} images in {len(dataset.subsets)} subsets; {len(plan.items)} train, "
             f"{len(plan.unassigned)} fit no bucket, {len(dataset.skipped)} unreadable."]
    lines += _subset_lines(dataset, plan)
    lines += _bucket_lines(plan, batch_size)
    lines += _caption_lines(dataset)
    lines += _problem_lines(dataset, plan)
    return "\n".join(lines)


def _subset_lines(dataset: Dataset, plan: DatasetPlan) -> list[str]:
    lines = ["", "Subsets:"]
    per_subset = Counter()
    for item in plan.items:
        per_subset[id(item.subset)] += item.repeats
    for subset in dataset.subsets:
        width, height = plan.resolutions[subset.name]
        kind = "regularization" if subset.is_reg else "training"
        caching = "latents cached" if subset.augment.cacheable else "latents encoded every step (random crop)"
        texts = "captions vary per step (text cache off)" if subset.captions.varies else "captions cached"
        extras = [name for name, on in (("flip", subset.augment.flip), ("random crop", subset.augment.random_crop),
                                        ("alpha mask", subset.augment.alpha_mask)) if on]
        lines.append(f"- {subset.name} ({kind}, from {subset.source or 'graph'}): {len(subset)} images x {subset.repeats} "
                     f"repeats = {per_subset[id(subset)]} per epoch; buckets {'on' if subset.buckets.enabled else 'off'} "
                     f"at {width}x{height}; {caching}; {texts}" + (f"; {', '.join(extras)}" if extras else ""))
        if subset.class_tokens:
            lines.append(f"    class tokens: '{subset.class_tokens}'")
    return lines


def _bucket_lines(plan: DatasetPlan, batch_size: int) -> list[str]:
    counts = plan.bucket_counts()
    images = Counter(item.assignment.bucket for item in plan.items)
    lines = ["", f"Buckets (width x height: images, with repeats, batches of {batch_size}):"]
    for bucket in sorted(counts):
        lines.append(f"- {bucket[0]}x{bucket[1]}: {images[bucket]} images, {counts[bucket]} with repeats, "
                     f"{math.ceil(counts[bucket] / batch_size)} batches")
    steps = plan.batches_per_epoch(batch_size)
    lines.append(f"Steps per epoch at batch size {batch_size}: {steps}")
    if plan.items:
        error = statistics.mean(abs(item.assignment.ar_error) for item in plan.items)
        lines.append(f"Mean aspect-ratio error: {error:.3f}")
    return lines


def _caption_lines(dataset: Dataset) -> list[str]:
    captions = [(subset, image.caption) for subset in dataset.subsets for image in subset.images]
    if not captions:
        return []
    words = [len(caption.split()) for _, caption in captions]
    tags = Counter()
    for subset, caption in captions:
        fixed, flex, suffix = split_tags(caption, subset.captions)
        tags.update(tag for tag in fixed + flex + suffix if tag)
    empty = sum(1 for _, caption in captions if not caption.strip())
    lines = ["", f"Captions: {min(words)}-{max(words)} words, mean {statistics.mean(words):.1f}; "
                 f"{len(set(c for _, c in captions))} distinct; {empty} empty; {len(tags)} distinct tags."]
    lines.append("Top tags: " + ", ".join(f"{tag} ({count})" for tag, count in tags.most_common(20)))
    return lines


def _problem_lines(dataset: Dataset, plan: DatasetPlan) -> list[str]:
    lines = []
    upscaled = [item for item in plan.items if item.assignment.resized[0] / item.size[0] > UPSCALE_WARNING]
    if upscaled:
        lines.append(f"{len(upscaled)} images are enlarged more than {UPSCALE_WARNING:g}x (may train blurry): "
                     + ", ".join(f"{item.image.name} {item.size[0]}x{item.size[1]}" for item in upscaled[:5]))
    unused = [item.image.name for item in plan.items if item.repeats == 0]
    if unused:
        lines.append(f"{len(unused)} regularization images are not used (more than the training images need).")
    by_digest: dict[str, list[str]] = {}
    for image in dataset.images:
        if image.digest:
            by_digest.setdefault(image.digest, []).append(image.name)
    duplicates = [names for names in by_digest.values() if len(names) > 1]
    if duplicates:
        lines.append(f"{len(duplicates)} groups of identical images: " + "; ".join(" = ".join(n) for n in duplicates[:5]))
    lines += [f"Note: {note}" for note in dataset.notes]
    if plan.unassigned:
        lines.append(f"Not trained ({len(plan.unassigned)}):")
        lines += [f"- {item.source}: {item.reason}" for item in plan.unassigned]
    if dataset.skipped:
        lines.append(f"Skipped, unreadable ({len(dataset.skipped)}):")
        lines += [f"- {item.source}: {item.reason}" for item in dataset.skipped]
    return ["", *lines] if lines else []


def preview_grid(plan: DatasetPlan, count: int = 8, cell: int = 192, columns: int = 4) -> np.ndarray:
    """float32 [H, W, 3] in 0..1: the first `count` items as they train (bucket crop), each with its
    bucket and caption underneath. Items are spread over the subsets."""
    items = _spread(plan, count)
    if not items:
        return np.ones((cell, cell, 3), dtype=np.float32)
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    text_height = 44
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for index, item in enumerate(items):
        x, y = (index % columns) * cell, (index // columns) * (cell + text_height)
        pixels, _ = crop_to_bucket(item.image.load(), item.assignment, centre_crop(item.assignment))
        thumb = Image.fromarray((pixels * 255).round().astype(np.uint8))
        thumb.thumbnail((cell - 4, cell - 4))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        bucket = f"{item.assignment.bucket[0]}x{item.assignment.bucket[1]} x{item.repeats}"
        draw.text((x + 4, y + cell), bucket, fill=(0, 0, 160), font=font)
        caption = item.image.caption or "(empty caption)"
        for line_number, start in enumerate(range(0, min(len(caption), 2 * (cell // 6)), cell // 6)):
            draw.text((x + 4, y + cell + 14 + 13 * line_number), caption[start:start + cell // 6], fill=(0, 0, 0), font=font)
    return np.asarray(sheet, dtype=np.float32) / 255.0


def _spread(plan: DatasetPlan, count: int) -> list:
    """Round-robin over subsets so each one shows."""
    groups: dict[int, list] = {}
    for item in plan.items:
        groups.setdefault(id(item.subset), []).append(item)
    picked, queues = [], [list(group) for group in groups.values()]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked
