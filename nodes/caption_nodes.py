"""Caption nodes: auto-captioning with a model from models/captioners, caption processing on the dataset in
the graph (a new dataset, files untouched), and Save Captions, the one node that writes caption files.
Thin shells over trainer/captions."""

import gc
import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..trainer.captions import ops
from ..trainer.captions.autocaption import (
    CAPTION_MODES, AutoCaptionSettings, CaptionerError, caption_dataset, detect_captioner, load_captioner,
)
from ..trainer.captions.dataset_captions import SAVE_MODES, changes_summary, map_captions, save_captions
from ..trainer.errors import ConfigError
from .dataset_nodes import DatasetType
from .paths import resolve_dataset_folder

log = logging.getLogger("tunekit")
CATEGORY = "TuneKit/captions"
CAPTIONERS = "captioners"
NO_CAPTIONER = "(no model folder in models/captioners)"
DATASET_TOOLTIP = "From a TuneKit dataset node."


def register_captioners_folder() -> None:
    """models/captioners, and a 'captioners' folder beside every checkpoints folder ComfyUI knows (shared model
    trees set up in extra_model_paths.yaml)."""
    folder_paths.add_model_folder_path(CAPTIONERS, os.path.join(folder_paths.models_dir, CAPTIONERS))
    for root in folder_paths.get_folder_paths("checkpoints"):
        folder_paths.add_model_folder_path(CAPTIONERS, str(Path(root).parent / CAPTIONERS))


def captioner_folders() -> list[str]:
    names = set()
    for root in folder_paths.get_folder_paths(CAPTIONERS):
        if Path(root).is_dir():
            names.update(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(names)


def captioner_path(name: str) -> Path:
    for root in folder_paths.get_folder_paths(CAPTIONERS):
        path = Path(root) / name
        if name and "/" not in name and "\\" not in name and name not in (".", "..") and path.is_dir():
            return path
    raise CaptionerError(f"No captioner folder {name!r} in models/captioners "
                         f"({', '.join(folder_paths.get_folder_paths(CAPTIONERS))}): put a model folder there "
                         "(e.g. a WD14 tagger's model.onnx + selected_tags.csv) and refresh the node list.")


class AutoCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitAutoCaption",
            display_name="Auto Caption",
            category=CATEGORY,
            description="Captions the dataset's images with a model folder from models/captioners: a WD14 tagger "
                        "(model.onnx + selected_tags.csv; needs onnxruntime) or a transformers BLIP, BLIP-2, GIT or "
                        "Florence-2 folder (native classes; code inside model folders is never run). Returns the "
                        "dataset with the new captions; nothing is written until Save Captions.",
            inputs=[
                DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                io.Combo.Input("captioner", options=captioner_folders() or [NO_CAPTIONER],
                               tooltip="A model folder in models/captioners."),
                io.Combo.Input("mode", options=list(CAPTION_MODES), default="only missing",
                               tooltip="only missing: caption images without caption file (or an empty one), "
                                       "after their trigger word; overwrite: replace every caption (put a trigger "
                                       "word in prefix); append: add the model's text to each."),
                io.String.Input("prefix", default="", tooltip="Trigger words put first in every new caption, comma "
                                                              "separated, e.g. 'sks, photo'."),
                io.Int.Input("max_length", default=0, min=0, max=512,
                             tooltip="0: default. Captioning models: tokens generated (40). Taggers: tags kept (all)."),
                io.Float.Input("general_threshold", default=0.35, min=0, max=1, step=0.01,
                               tooltip="Taggers: the lowest score a general tag needs."),
                io.Float.Input("character_threshold", default=0.85, min=0, max=1, step=0.01,
                               tooltip="Taggers: the lowest score a character tag needs."),
                io.String.Input("exclude_tags", default="", tooltip="Tags never written, comma separated."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images captioned at once."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, dataset, captioner, mode, prefix, max_length, general_threshold, character_threshold,
                exclude_tags, batch_size):
        settings = AutoCaptionSettings(mode, prefix, max_length, general_threshold, character_threshold, exclude_tags,
                                       batch_size)
        if settings.problems():
            raise ConfigError(settings.problems())
        found = detect_captioner(captioner_path(captioner))
        result, report = _caption_on_device(dataset, found, settings, cls.hidden.unique_id)
        text = report.summary()
        return io.NodeOutput(result, text, ui=ui.PreviewText(text))


def _caption_on_device(dataset, found, settings, node_id):
    """Load the captioner where ComfyUI would run a model (room made by its memory management), caption, and
    free it (and the cache) afterwards, also when cancelled."""
    import comfy.model_management as mm
    import comfy.utils
    import torch

    device = mm.get_torch_device()
    if device.type != "cpu":
        mm.free_memory(_folder_bytes(found.path) * 1.5, device)
    dtype = torch.float16 if device.type == "cuda" and mm.should_use_fp16(device) else torch.float32
    progress = comfy.utils.ProgressBar(max(1, len(dataset)), node_id=node_id)

    def on_batch(done: int, total: int) -> None:
        progress.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    captioner = load_captioner(found, settings, str(device), dtype)
    try:
        return caption_dataset(dataset, captioner, settings, found.path.name, found.kind, on_batch)
    finally:
        if hasattr(captioner, "close"):
            captioner.close()
        del captioner
        gc.collect()
        mm.soft_empty_cache()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _changed(dataset, change, what: str) -> io.NodeOutput:
    result, changes = map_captions(dataset, lambda image: change(image.caption))
    text = changes_summary(changes, len(dataset), what)
    log.info("TuneKit: %s", text.splitlines()[0])
    return io.NodeOutput(result, text)


def _outputs():
    return [DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")]


class CaptionAddText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCaptionAddText", display_name="Captions: Add Text", category=CATEGORY,
            description="Puts text at the start or end of every caption (joined by ', '). Captions that already "
                        "start (end) with it are left as they are, so running it again adds nothing.",
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.String.Input("text", default="", tooltip="e.g. 'photo of sks' or 'masterpiece'."),
                    io.Combo.Input("position", options=["start", "end"], default="start")],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, dataset, text, position):
        text = text.strip()

        def add(caption: str) -> str:
            present = caption.strip().startswith(text) if position == "start" else caption.strip().endswith(text)
            if present:
                return caption
            return ops.prepend(caption, text) if position == "start" else ops.append(caption, text)

        return _changed(dataset, add, f"Add text {text!r} at the {position}")


class CaptionFindReplace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCaptionFindReplace", display_name="Captions: Find and Replace", category=CATEGORY,
            description="Replaces text in every caption, literally or as a Python regular expression (\\1 in the "
                        "replacement inserts a group).",
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.String.Input("find", default=""),
                    io.String.Input("replace", default=""),
                    io.Boolean.Input("regex", default=False),
                    io.Boolean.Input("case_sensitive", default=True)],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, dataset, find, replace, regex, case_sensitive):
        return _changed(dataset, lambda c: ops.replace_text(c, find, replace, regex, case_sensitive),
                        f"Replace {find!r} with {replace!r}")


class CaptionTriggerWord(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCaptionTriggerWord", display_name="Captions: Trigger Word", category=CATEGORY,
            description="Adds a trigger word as a tag to every caption that lacks it, or removes it as a whole tag "
                        "everywhere.",
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.String.Input("trigger_word", default="", tooltip="e.g. 'sks' or 'tkstyle'."),
                    io.Combo.Input("action", options=["add at start", "add at end", "remove"], default="add at start")],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, dataset, trigger_word, action):
        if action == "remove":
            return _changed(dataset, lambda c: ops.remove_trigger(c, trigger_word), f"Remove {trigger_word!r}")
        return _changed(dataset, lambda c: ops.add_trigger(c, trigger_word, at_end=action == "add at end"),
                        f"Add {trigger_word!r}")


class CaptionTags(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCaptionTags", display_name="Captions: Tags", category=CATEGORY,
            description="Tag clean-up on comma-separated captions, in this order: rename, remove, lowercase, "
                        "dedupe, order. Tags compare ignoring case, extra spaces and '_' vs ' '.",
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.String.Input("remove_tags", default="", tooltip="Tags to remove, comma separated."),
                    io.String.Input("rename_tags", default="", multiline=True,
                                    tooltip="One rename per line: 'old tag = new tag' (an empty new name removes it)."),
                    io.Boolean.Input("lowercase", default=False),
                    io.Boolean.Input("dedupe", default=True, tooltip="Keep each tag once, at its first place."),
                    io.Combo.Input("order", options=["keep", "sort", "shuffle"], default="keep",
                                   tooltip="shuffle: once, with the seed (per-step shuffling is a training option)."),
                    io.Int.Input("keep_first", default=0, min=0, max=100,
                                 tooltip="Sort/shuffle leave this many first tags (e.g. the trigger word) in place."),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, dataset, remove_tags, rename_tags, lowercase, dedupe, order, keep_first, seed):
        renames, unwanted = ops.parse_renames(rename_tags), ops.split_tags(remove_tags)

        def clean(caption: str) -> str:
            caption = ops.rename_tags(caption, renames) if renames else caption
            caption = ops.remove_tags(caption, unwanted) if unwanted else caption
            caption = ops.lowercase(caption) if lowercase else caption
            caption = ops.dedupe_tags(caption) if dedupe else caption
            if order == "sort":
                caption = ops.sort_tags(caption, keep_first)
            elif order == "shuffle":
                caption = ops.shuffle_tags(caption, seed, keep_first)
            return caption

        return _changed(dataset, clean, "Tags")


class CaptionLimit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCaptionLimit", display_name="Captions: Length Limit", category=CATEGORY,
            description="Shortens captions to whole tags (or words): at most this many tags and characters.",
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.Int.Input("max_tags", default=0, min=0, max=1000, tooltip="0: no limit."),
                    io.Int.Input("max_characters", default=0, min=0, max=100_000, tooltip="0: no limit.")],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, dataset, max_tags, max_characters):
        return _changed(dataset, lambda c: ops.limit_characters(ops.limit_tags(c, max_tags), max_characters),
                        f"Limit to {max_tags or 'any number of'} tags, {max_characters or 'any number of'} characters")


class SaveCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitSaveCaptions", display_name="Save Captions", category=CATEGORY,
            description="Writes every caption to the caption file beside its image (photo.png -> photo.txt), one "
                        "atomic replace per file, and reports what it created, overwrote and left alone.",
            is_output_node=True,
            inputs=[DatasetType.Input("dataset", tooltip=DATASET_TOOLTIP),
                    io.Combo.Input("mode", options=list(SAVE_MODES), default="only missing",
                                   tooltip="only missing: write caption files that do not exist yet, keep every "
                                           "existing one; overwrite: also replace existing files whose text differs.")],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset, mode):
        report = save_captions(dataset, mode, check_path=lambda path: resolve_dataset_folder(str(path.parent)))
        text = report.summary()
        return io.NodeOutput(text, ui=ui.PreviewText(text))


register_captioners_folder()

CAPTION_NODES = [AutoCaption, CaptionAddText, CaptionFindReplace, CaptionTriggerWord, CaptionTags, CaptionLimit,
                 SaveCaptions]
