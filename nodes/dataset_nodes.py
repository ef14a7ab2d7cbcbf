"""Dataset nodes: each turns a source into the one TUNEKIT_DATASET type the trainer consumes."""

import logging

import numpy as np
from comfy_api.latest import io

from ..trainer.data import MISSING_CAPTION_POLICIES, dataset_from_pixels, scan_image_folder
from ..trainer.errors import DatasetError
from .paths import resolve_dataset_folder

log = logging.getLogger("tunekit")
DatasetType = io.Custom("TUNEKIT_DATASET")
CATEGORY = "TuneKit/dataset"

TRIGGER_TOOLTIP = "Prepended to every caption that lacks it, e.g. 'tkstyle'. Use this word in prompts to call up what was learned."


class DatasetFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromFolder",
            display_name="Dataset from Folder",
            category=CATEGORY,
            description="Training images from a folder, each with a caption file of the same name (photo.png + photo.txt).",
            inputs=[
                io.String.Input("folder", default="tunekit_dataset", tooltip="A folder inside ComfyUI's input directory (or an absolute path inside an allowed root)."),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TOOLTIP),
                io.String.Input("caption_extension", default=".txt", tooltip="Extension of the caption files, e.g. .txt or .caption."),
                io.Combo.Input("missing_captions", options=list(MISSING_CAPTION_POLICIES), default="error",
                               tooltip="An image without caption file: stop with a list of them ('error'), or train it with the trigger word alone."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, trigger_word, caption_extension, missing_captions):
        """Re-read when a file is added, removed or edited (names, sizes, mtimes)."""
        try:
            path = resolve_dataset_folder(folder)
            return [(entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in sorted(path.iterdir())]
        except (OSError, DatasetError):
            return float("nan")  # never equal: let execute() report the problem

    @classmethod
    def execute(cls, folder, trigger_word, caption_extension, missing_captions):
        extension = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
        dataset = scan_image_folder(resolve_dataset_folder(folder), extension, trigger_word, missing_captions)
        log.info("TuneKit dataset: %s", dataset.summary())
        return io.NodeOutput(dataset, dataset.summary())


class DatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDatasetFromImages",
            display_name="Dataset from Images",
            category=CATEGORY,
            description="Training images produced earlier in the graph, with one caption for all or one per line.",
            inputs=[
                io.Image.Input("images", tooltip="A batch of images from the graph."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption for every image, or one line per image (as many lines as images)."),
                io.String.Input("trigger_word", default="", tooltip=TRIGGER_TOOLTIP),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, captions, trigger_word):
        captions_per_image = _captions_for(len(images), captions, trigger_word)
        pixels = (images[..., :3].clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
        dataset = dataset_from_pixels(pixels, captions_per_image)
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

