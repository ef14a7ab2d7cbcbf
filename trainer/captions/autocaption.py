"""Auto-captioning: caption a dataset's images with a model folder, e.g. ComfyUI's models/captioners/<name>.

Two kinds of folder are supported:
- a booru-style WD14 tagger: `model.onnx` (NHWC input, sigmoid scores) + `selected_tags.csv` (tag_id, name,
  category, count; category 9 rating, 4 character, 0 general), run with onnxruntime (an optional package);
- a transformers image-to-text model of a native class (BLIP, BLIP-2, GIT, Florence-2 as converted for
  transformers' own Florence2 class): `config.json`, weights, tokenizer files and `preprocessor_config.json`.
  Code shipped inside a model folder (`auto_map`, `trust_remote_code`) is never run.

Images are preprocessed here with PIL and numpy (as the models' own processors do) rather than through
transformers' image processors, which need torchvision. The host hands the device, dtype and a per-batch
callback (progress bar, interrupt); this module imports nothing of it.
"""

import copy
import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from ..data.dataset import Dataset, Subset, TrainImage
from ..errors import TuneKitError
from ..optional import require
from . import ops
from .dataset_captions import CaptionChange, has_caption_file, map_captions

log = logging.getLogger(__name__)

# model_type in config.json -> the native transformers class that generates its captions.
IMAGE_TO_TEXT_CLASSES = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration",
                         "git": "GitForCausalLM", "florence2": "Florence2ForConditionalGeneration"}
# Florence-2's task: its processor turns "<DETAILED_CAPTION>" into this prompt.
FLORENCE_PROMPT = "Describe in detail what is shown in the image."
WD14_FILES = ("model.onnx", "selected_tags.csv")
CAPTION_MODES = ("only missing", "overwrite", "append")
DEFAULT_NEW_TOKENS = 40
RATING, GENERAL, CHARACTER = 9, 0, 4
# WD14 tags written with "_" that are faces, not words: kept as they are (kohya's tagger keeps them too).
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
SUPPORTED_TEXT = ("a WD14 tagger (model.onnx + selected_tags.csv), or a transformers image-to-text model folder "
                  f"(config.json with model_type {', '.join(IMAGE_TO_TEXT_CLASSES)} and no 'auto_map', its weights, tokenizer and "
                  "preprocessor_config.json)")


class CaptionerError(TuneKitError):
    pass


@dataclass(frozen=True)
class CaptionerFolder:
    path: Path
    kind: str  # "wd14" or a key of IMAGE_TO_TEXT_CLASSES


def detect_captioner(folder: Path) -> CaptionerFolder:
    """Which kind of captioner `folder` holds; anything else raises a CaptionerError listing what was found."""
    if not folder.is_dir():
        raise CaptionerError(f"Captioner folder '{folder}' does not exist: put a model folder in models/captioners.")
    if all((folder / name).is_file() for name in WD14_FILES):
        return CaptionerFolder(folder, "wd14")
    config = _read_config(folder)
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise CaptionerError(
            f"Captioner '{folder.name}' (model_type {model_type!r}) needs Python code shipped inside the model "
            "folder (config.json 'auto_map', trust_remote_code), which TuneKit does not run. Use a folder converted "
            "to a native transformers class (for Florence-2: the florence-community conversions), or another "
            f"captioner. Supported: {SUPPORTED_TEXT}.")
    if model_type in IMAGE_TO_TEXT_CLASSES:
        return CaptionerFolder(folder, model_type)
    found = sorted(p.name for p in folder.iterdir())[:20]
    what = f"model_type {model_type!r}" if model_type else f"files {found or 'none'}"
    raise CaptionerError(f"Captioner '{folder.name}' is not a kind TuneKit knows ({what}). Supported: {SUPPORTED_TEXT}.")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{path} is not valid JSON ({error}): re-copy the model folder.") from None


@dataclass(frozen=True)
class AutoCaptionSettings:
    mode: str = "only missing"  # CAPTION_MODES: caption images without caption file / all (replace) / all (add)
    prefix: str = ""  # trigger words put first, comma separated: "sks, photo"
    max_length: int = 0  # 0: default. Generated tokens (image-to-text models, 40) or tags kept (taggers: all)
    general_threshold: float = 0.35  # WD14: lowest score of a general tag
    character_threshold: float = 0.85  # WD14: lowest score of a character tag
    exclude_tags: str = ""  # comma separated tags never written
    batch_size: int = 4

    def problems(self) -> list[str]:
        found = []
        if self.mode not in CAPTION_MODES:
            found.append(f"mode is {self.mode!r}: use one of {', '.join(CAPTION_MODES)}.")
        for name in ("general_threshold", "character_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{name} is {getattr(self, name)}: use a score from 0 to 1 (0.35 general, 0.85 character).")
        if self.max_length < 0:
            found.append(f"max_length is {self.max_length}: use 0 (the default) or more.")
        if self.batch_size < 1:
            found.append(f"batch_size is {self.batch_size}: use 1 or more.")
        return found


class Captioner(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str]: ...


# ---------------------------------------------------------------------------------------------
# WD14 taggers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_tags_csv(path: Path) -> list[Tag]:
    """selected_tags.csv (tag_id, name, category, count), one row per model output."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise CaptionerError(f"{path} has no 'name' and 'category' columns: a WD14 tags CSV starts with "
                             "'tag_id,name,category,count'.")
    return [Tag(row["name"], int(row["category"])) for row in rows]


def readable_tag(name: str) -> str:
    """'long_hair' -> 'long hair'; kaomoji such as '^_^' stay as they are."""
    return name if name in KAOMOJI else name.replace("_", " ")


def select_tags(scores: np.ndarray, tags: list[Tag], general: float, character: float, max_tags: int = 0) -> list[str]:
    """Character tags at or above `character`, then general tags at or above `general`, each by falling score;
    rating tags never. `max_tags` > 0 keeps the first that many."""
    def above(category: int, threshold: float) -> list[int]:
        picked = [i for i, tag in enumerate(tags) if tag.category == category and scores[i] >= threshold]
        return sorted(picked, key=lambda i: -scores[i])

    chosen = above(CHARACTER, character) + above(GENERAL, general)
    names = [readable_tag(tags[i].name) for i in chosen]
    return names[:max_tags] if max_tags > 0 else names


def wd14_input(image: Image.Image, size: int) -> np.ndarray:
    """[size, size, 3] float32 BGR in 0..255: padded to a white square, resized bicubic (SmilingWolf's recipe)."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])


class WD14Tagger:
    def __init__(self, folder: Path, settings: AutoCaptionSettings, device: str = "cpu"):
        ort = require("onnxruntime", "WD14 tagger auto-captioning")
        self.settings = settings
        self.tags = read_tags_csv(folder / "selected_tags.csv")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=_onnx_providers(ort, device))
        model_input = self.session.get_inputs()[0]
        self.input_name, shape = model_input.name, model_input.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise CaptionerError(f"{folder / 'model.onnx'} takes input shape {shape}: a WD14 tagger takes "
                                 "[batch, size, size, 3] (NHWC, BGR).")
        self.size = shape[1]
        self.one_at_a_time = shape[0] == 1  # exported with a fixed batch of 1
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise CaptionerError(f"{folder.name}: the model scores {outputs} tags but selected_tags.csv lists "
                                 f"{len(self.tags)}: the two files belong to different models.")

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([wd14_input(image, self.size) for image in images])
        if self.one_at_a_time:
            return np.concatenate([self.session.run(None, {self.input_name: one[None]})[0] for one in batch])
        return self.session.run(None, {self.input_name: batch})[0]

    def caption(self, images: list[Image.Image]) -> list[str]:
        s = self.settings
        return [ops.join_tags(select_tags(row, self.tags, s.general_threshold, s.character_threshold, s.max_length))
                for row in self.scores(images)]


def _onnx_providers(ort, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        log.info("TuneKit: onnxruntime has no CUDA provider here (%s): the tagger runs on the CPU", available)
    return ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------
# transformers image-to-text models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelPreprocess:
    """What a transformers image processor does to an image, read from preprocessor_config.json: resize to
    (height, width) or shortest edge, optional centre crop, rescale, normalize, channels first."""

    size: tuple[int, int] | int  # (height, width), or the shortest edge
    crop: tuple[int, int] | None = None
    resample: int = Image.Resampling.BICUBIC
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: Path) -> "PixelPreprocess":
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            raise CaptionerError(f"Captioner '{folder.name}' has no preprocessor_config.json: copy the whole model "
                                 "folder (it comes with the model).")
        config = json.loads(path.read_text(encoding="utf-8"))
        size = config.get("size", 384)
        size = (size, size) if isinstance(size, int) else (
            (size["height"], size["width"]) if "height" in size else size["shortest_edge"])
        crop = config.get("crop_size") if config.get("do_center_crop") else None
        crop = (crop, crop) if isinstance(crop, int) else ((crop["height"], crop["width"]) if crop else None)
        return cls(size, crop, config.get("resample", Image.Resampling.BICUBIC),
                   config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0,
                   *((tuple(config.get("image_mean", cls.mean)), tuple(config.get("image_std", cls.std)))
                     if config.get("do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)))

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """[batch, 3, height, width] float32."""
        return np.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        image = image.resize(self._resized(image.width, image.height), self.resample)
        if self.crop:
            height, width = self.crop
            top, left = (image.height - height) // 2, (image.width - width) // 2
            image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.rescale)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        if isinstance(self.size, tuple):
            return self.size[1], self.size[0]
        short, long = sorted((width, height))
        scaled = int(self.size * long / short)
        return (self.size, scaled) if width <= height else (scaled, self.size)


class ImageToTextCaptioner:
    def __init__(self, folder: Path, kind: str, settings: AutoCaptionSettings, device: str = "cpu", dtype=None):
        import torch
        import transformers

        model_class = getattr(transformers, IMAGE_TO_TEXT_CLASSES[kind])
        self.device = torch.device(device)
        self.model = model_class.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                 dtype=dtype or torch.float32).to(self.device).eval()
        self.dtype = self.model.dtype  # what it really loaded as (some parts may stay fp32 by design)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                                    trust_remote_code=False)
        self.preprocess = PixelPreprocess.from_folder(folder)
        self.prompt = florence_prompt_ids(self.tokenizer, folder, self.model.config) if kind == "florence2" else None
        # Passed whole: BLIP-2 hands it on to its language model, which otherwise uses its own defaults.
        self.generation = copy.deepcopy(self.model.generation_config)
        self.generation.update(max_new_tokens=settings.max_length or DEFAULT_NEW_TOKENS, do_sample=False)

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = {"pixel_values": torch.from_numpy(self.preprocess(images)).to(self.device, self.dtype)}
        if self.prompt is not None:
            ids = torch.tensor([self.prompt] * len(images), device=self.device)
            inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, generation_config=self.generation)
        return [" ".join(text.split()) for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def close(self) -> None:
        self.model.to("cpu")
        del self.model


def florence_prompt_ids(tokenizer, folder: Path, config) -> list[int]:
    """What Florence2Processor makes of the task "<DETAILED_CAPTION>": one image token per image feature, then
    the task's prompt between BOS and EOS (no other special tokens)."""
    settings = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    if "image_seq_length" not in settings:
        raise CaptionerError(f"Florence-2 captioner '{folder.name}': preprocessor_config.json has no "
                             "'image_seq_length' (a transformers Florence-2 folder has it): re-copy the model folder.")
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    text = image_token * settings["image_seq_length"] + tokenizer.bos_token + FLORENCE_PROMPT + tokenizer.eos_token
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_captioner(found: CaptionerFolder, settings: AutoCaptionSettings, device: str = "cpu", dtype=None) -> Captioner:
    if found.kind == "wd14":
        return WD14Tagger(found.path, settings, device)
    return ImageToTextCaptioner(found.path, found.kind, settings, device, dtype)


# ---------------------------------------------------------------------------------------------
# Captioning a dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class AutoCaptionReport:
    model: str
    kind: str
    mode: str
    captioned: int = 0  # images the model captioned
    left: int = 0  # images with a caption file, left alone ("only missing")
    seconds: float = 0.0
    changes: list[CaptionChange] = field(default_factory=list)

    def summary(self) -> str:
        per_image = f", {self.seconds / self.captioned:.2f} s per image" if self.captioned else ""
        lines = [f"Auto-captioned {self.captioned} images with {self.model} ({self.kind}, mode {self.mode}) in "
                 f"{self.seconds:.1f} s{per_image}; {len(self.changes)} captions changed."]
        if self.left:
            lines.append(f"Left {self.left} images that have a caption file (mode 'only missing').")
        lines += [f"  {c.image}: {c.before!r} -> {c.after!r}" for c in self.changes[:5]]
        if len(self.changes) > 5:
            lines.append(f"  ... and {len(self.changes) - 5} more")
        lines.append("Nothing is written to disk until a Save Captions node saves these captions.")
        return "\n".join(lines)


def caption_dataset(
    dataset: Dataset, captioner: Captioner, settings: AutoCaptionSettings, model_name: str = "", kind: str = "",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[Dataset, AutoCaptionReport]:
    """A new Dataset whose chosen images carry the model's captions (combined per `settings.mode`), and a report.

    `on_batch(done, total)` runs after each batch (a progress bar; it may raise to stop).
    """
    started, report = time.perf_counter(), AutoCaptionReport(model_name, kind, settings.mode)
    todo = [image for subset in dataset.subsets for image in subset.images if _wanted(image, subset, settings)]
    report.left = len(dataset) - len(todo)
    generated: dict[int, str] = {}
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start:start + settings.batch_size]
        for image, text in zip(batch, captioner.caption([image.load() for image in batch])):
            generated[id(image)] = text
        if on_batch:
            on_batch(start + len(batch), len(todo))
    report.captioned = len(todo)

    def combine(image: TrainImage) -> str:
        text = generated.get(id(image))
        return image.caption if text is None else combined_caption(image.caption, text, settings)

    result, report.changes = map_captions(dataset, combine)
    report.seconds = time.perf_counter() - started
    log.info("TuneKit: %s", report.summary().splitlines()[0])
    return result, report


def _wanted(image: TrainImage, subset: Subset, settings: AutoCaptionSettings) -> bool:
    if settings.mode != "only missing":
        return True
    return not has_caption_file(image, subset) if image.pixels is None else not image.caption.strip()


def combined_caption(old: str, generated: str, settings: AutoCaptionSettings) -> str:
    """The model's text without excluded tags, replacing the old caption (overwrite) or added to it, trigger words
    first. 'only missing' adds it too: an image without caption file holds what its dataset node put there
    (the trigger word, kohya's class tokens), which stays in front."""
    excluded = ops.split_tags(settings.exclude_tags)
    text = ops.remove_tags(generated, excluded) if excluded else generated
    caption = text if settings.mode == "overwrite" else ops.dedupe_tags(ops.append(old, text))
    for word in reversed(ops.split_tags(settings.prefix)):
        caption = ops.add_trigger(caption, word)
    return caption

