"""Dataset nodes: each turns a source into the one TUNEKIT_DATASET type the trainer consumes, plus a report,
a merge and a kohya TOML export. Thin shells over trainer/data."""

import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..trainer.data import (
    MISSING_CAPTION_POLICIES, Augment, BucketSettings, dataset_from_pixels, export_kohya_toml, is_legacy_layout,
    plan_dataset, read_kohya_toml, scan_image_folder, scan_legacy_folders, scan_metadata_folder,
)
from ..trainer.data.folder import list_images
from ..trainer.data.report import dataset_report, preview_grid
from ..trainer.errors import DatasetError
from .paths import PathNotAllowed, checked_name, resolve_dataset_folder

log = logging.getLogger("tunekit")
DatasetType = io.Custom("TUNEKIT_DATASET")
CATEGORY = "TuneKit/dataset"

TRIGGER_TOOLTIP = "Prepended to every caption that lacks it, e.g. 'tkstyle'. Use this word in prompts to call up what was learned."
FOLDER_TOOLTIP = "A folder inside ComfyUI's input directory (or an absolute path inside an allowed root)."
REPEATS_TOOLTIP = "How many times each image is shown per epoch (kohya num_repeats)."


def _subset_inputs():
    """Inputs every file source shares, appended after each node's own and optional, so workflows and API
    prompts made before them still validate and keep their values."""
    return [
        io.Int.Input("repeats", default=1, min=1, max=10_000, optional=True, tooltip=REPEATS_TOOLTIP),
        io.Boolean.Input("buckets", default=True, optional=True,
                         tooltip="Aspect-ratio buckets as kohya makes them (on), or every image centre-cropped to a square (off)."),
        io.Boolean.Input("random_crop", default=False, optional=True,
                         tooltip="Crop at a random place inside the bucket each step (latents are then encoded every step)."),
        io.Boolean.Input("flip", default=False, optional=True, tooltip="Mirror images at random (both sides are cached)."),
    ]


def _subset_options(repeats=1, buckets=True, random_crop=False, flip=False) -> dict:
    return dict(repeats=repeats, buckets=BucketSettings(enabled=buckets), augment=Augment(random_crop=random_crop, flip=flip))


def _extension(caption_extension: str) -> str:
    return caption_extension if caption_extension.startswith(".") else f".{caption_extension}"


def _listing(folder: Path, recursive: bool) -> list:
    """Names, sizes and mtimes of every file (images and captions): an edited caption re-reads the
    dataset, unchanged files keep the node cached."""
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _done(dataset):
    log.info("TuneKit dataset: %s", dataset.summary())
    return io.NodeOutput(dataset, dataset.summary())


class DatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromFolder",
            display_name="Dataset from Folder",
            category=CATEGORY,
            description="Training images from a folder, each with a caption file of the same name (photo.png + photo.txt). "
                        "A folder of kohya-style '<repeats>_<class tokens>' subfolders (e.g. '10_sks dog') becomes one subset each.",
            inputs=[
                io.String.Input("folder", default="tunekit_dataset", tooltip=FOLDER_TOOLTIP),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TOOLTIP),
                io.String.Input("caption_extension", default=".txt", tooltip="Extension of the caption files, e.g. .txt or .caption."),
                io.Combo.Input("missing_captions", options=list(MISSING_CAPTION_POLICIES), default="error",
                               tooltip="An image without caption file: stop with a list of them ('error'), or train it with the trigger word alone."),
                io.Boolean.Input("recursive", default=False, optional=True, tooltip="Also read images in subfolders."),
                *_subset_inputs(),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, recursive=False, **settings):
        """Re-read when a file is added, removed or edited (names, sizes, mtimes)."""
        try:
            path = resolve_dataset_folder(folder)
            return _listing(path, recursive or is_legacy_layout(path))
        except (OSError, DatasetError, PathNotAllowed):
            return float("nan")  # never equal: let execute() report the problem

    @classmethod
    def execute(cls, folder, trigger_word, caption_extension, missing_captions, recursive=False, **options):
        path, extension = resolve_dataset_folder(folder), _extension(caption_extension)
        if is_legacy_layout(path) and not recursive and not _has_images(path):
            dataset = scan_legacy_folders(path, extension, trigger_word, **_legacy_options(**options))
        else:
            dataset = scan_image_folder(path, extension, trigger_word, missing_captions, recursive, **_subset_options(**options))
        return _done(dataset)


def _has_images(path: Path) -> bool:
    return bool(list_images(path, False))


def _legacy_options(repeats=1, **options) -> dict:
    """Legacy folders carry their own repeats in the folder name."""
    settings = _subset_options(**options)
    settings.pop("repeats")
    return settings


class DatasetFromMetadata(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromMetadata",
            display_name="Dataset from Metadata (imagefolder)",
            category=CATEGORY,
            description="A Hugging Face imagefolder dataset: images plus metadata.jsonl or metadata.csv with a file_name column and a caption column.",
            inputs=[
                io.String.Input("folder", default="tunekit_dataset", tooltip="The folder that holds metadata.jsonl or metadata.csv. " + FOLDER_TOOLTIP),
                io.String.Input("caption_column", default="text", tooltip="The metadata column with the captions ('text' in the diffusers examples)."),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TOOLTIP),
                *_subset_inputs(),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **settings):
        try:
            return _listing(resolve_dataset_folder(folder), True) + [
                (p.name, p.stat().st_mtime_ns) for p in resolve_dataset_folder(folder).glob("metadata.*")]
        except (OSError, DatasetError, PathNotAllowed):
            return float("nan")

    @classmethod
    def execute(cls, folder, caption_column, trigger_word, **options):
        return _done(scan_metadata_folder(resolve_dataset_folder(folder), caption_column.strip() or "text", trigger_word,
                                          **_subset_options(**options)))


class DatasetFromTOML(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromTOML",
            display_name="Dataset from kohya TOML",
            category=CATEGORY,
            description="A kohya sd-scripts dataset config ([general], [[datasets]], [[datasets.subsets]]). Unsupported keys "
                        "are listed in the report; typos stop with the file, line and the closest key.",
            inputs=[
                io.String.Input("toml_file", default="dataset.toml",
                                tooltip="The .toml file, relative to ComfyUI's input directory or absolute inside an allowed root. "
                                        "Relative image_dir values are relative to the TOML file."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, toml_file):
        try:
            path = resolve_dataset_folder(toml_file)
            return [path.stat().st_mtime_ns, path.stat().st_size, *_toml_listings(path)]
        except (OSError, DatasetError, PathNotAllowed):
            return float("nan")

    @classmethod
    def execute(cls, toml_file):
        path = resolve_dataset_folder(toml_file)
        if not path.is_file():
            raise DatasetError(f"TOML file not found: '{path}'. Put the kohya dataset config in ComfyUI's input folder.")
        return _done(read_kohya_toml(path, _allowed_dir))


def _allowed_dir(text: str, base: Path, where: str) -> Path:
    try:
        return resolve_dataset_folder(text, base)
    except PathNotAllowed as error:
        raise DatasetError(f"image_dir {error}") from None


def _toml_listings(path: Path) -> list:
    """The listing of every image_dir the TOML names (read leniently: execute() reports problems)."""
    from ..trainer.data.kohya_toml import load_toml

    listings = []
    for dataset in load_toml(path).get("datasets", []):
        for subset in dataset.get("subsets", []) if isinstance(dataset, dict) else []:
            if isinstance(subset, dict) and isinstance(subset.get("image_dir"), str):
                folder = _allowed_dir(subset["image_dir"], path.parent, "")
                listings.append(_listing(folder, False) if folder.is_dir() else None)
    return listings


class DatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromImages",
            display_name="Dataset from Images",
            category=CATEGORY,
            description="Training images produced earlier in the graph, with one caption for all or one per line, and an optional mask.",
            inputs=[
                io.Image.Input("images", tooltip="A batch of images from the graph."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption for every image, or one line per image (as many lines as images)."),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TOOLTIP),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where to learn: 1 trains, 0 is ignored (one mask for all, or one per image). "
                                      "LoadImage's mask is 1 where the image is transparent: invert it first."),
                io.Int.Input("repeats", default=1, min=1, max=10_000, optional=True, tooltip=REPEATS_TOOLTIP),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, captions, trigger_word, mask=None, repeats=1):
        captions_per_image = _captions_for(len(images), captions, trigger_word)
        pixels = (images[..., :3].clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
        masks = mask.to("cpu").float().numpy() if mask is not None else None
        dataset = dataset_from_pixels(pixels, captions_per_image, masks, repeats=repeats)
        return io.NodeOutput(dataset, dataset.summary())


def _captions_for(count: int, text: str, trigger_word: str) -> list[str]:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and len(lines) != count:
        raise DatasetError(
            f"{len(lines)} caption lines for {count} images: give one line per image, or a single caption for all."
        )
    captions = lines if len(lines) == count else [" ".join(lines)] * count
    trigger_word = trigger_word.strip()
    captions = [c if not trigger_word or trigger_word in c else f"{trigger_word}, {c}".rstrip(", ") for c in captions]
    if not all(captions):
        raise DatasetError("The images have no caption and no trigger word: type a caption or a trigger word.")
    return captions


class MergeDatasets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitMergeDatasets",
            display_name="Merge Datasets",
            category=CATEGORY,
            description="One dataset with the subsets of both: each keeps its repeats, captions and options.",
            inputs=[DatasetType.Input("dataset_a", tooltip="First dataset."),
                    DatasetType.Input("dataset_b", tooltip="Second dataset (e.g. regularization images).")],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, dataset_a, dataset_b):
        return io.NodeOutput(dataset_a.merged(dataset_b))


class DatasetReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetReport",
            display_name="Dataset Report",
            category=CATEGORY,
            description="What TuneKit made of a dataset: a preview grid of items as they train (bucket crop, caption) and "
                        "stats per subset and bucket, steps per epoch, caption lengths, tag frequency, everything skipped and why.",
            is_output_node=True,
            inputs=[
                DatasetType.Input("dataset", tooltip="From a TuneKit dataset node."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="The resolution you train at (Train LoRA's): buckets are made for it."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Train LoRA's batch size: for steps per epoch."),
                io.Int.Input("preview_count", default=8, min=0, max=64, tooltip="How many items the preview grid shows."),
            ],
            outputs=[io.Image.Output(display_name="preview"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset, resolution, batch_size, preview_count):
        plan = plan_dataset(dataset, resolution)
        text = dataset_report(dataset, resolution, batch_size, plan)
        grid = torch.from_numpy(preview_grid(plan, preview_count))[None]
        log.info("TuneKit dataset report:\n%s", text)
        return io.NodeOutput(grid, text, ui=ui.PreviewText(text))


class SaveDatasetTOML(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitSaveDatasetTOML",
            display_name="Save Dataset as kohya TOML",
            category=CATEGORY,
            description="Writes the dataset as a kohya sd-scripts dataset config into output/tunekit/datasets/<name>/. "
                        "Folders used as they are are referenced; other images (from the graph, captions changed by a "
                        "trigger word) are written beside it. Never overwrites.",
            is_output_node=True,
            inputs=[DatasetType.Input("dataset", tooltip="From a TuneKit dataset node."),
                    io.String.Input("name", default="tunekit_dataset", tooltip="Folder name under output/tunekit/datasets/.")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, dataset, name):
        import folder_paths

        out_dir = Path(folder_paths.get_output_directory()) / "tunekit" / "datasets" / checked_name(name, "name")
        path = export_kohya_toml(dataset, out_dir)
        log.info("TuneKit wrote the dataset config %s", path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"Wrote {path}"))


DATASET_NODES = [DatasetFromFolder, DatasetFromMetadata, DatasetFromTOML, DatasetFromImages, MergeDatasets,
                 DatasetReport, SaveDatasetTOML]
