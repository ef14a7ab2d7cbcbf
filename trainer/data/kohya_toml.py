"""kohya sd-scripts dataset configs (`--dataset_config`): `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

Every key sd-scripts' `library/config_util.py` accepts is accounted for in `KEYS`: applied, or reported as
unsupported; anything else is a typo, reported with the closest known key. Values are inherited
subset <- dataset <- general, as kohya does. Messages name the file and line.

Where TuneKit differs on purpose: a relative `image_dir` is relative to the TOML file (kohya: to the
directory it was started from), and an empty subset is an error rather than a warning.
"""

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DatasetError
from .buckets import BucketSettings
from .captions import CaptionOptions
from .dataset import RESIZE_INTERPOLATIONS, Augment, Dataset
from .folder import scan_image_folder

# Where a key may stand: "subset" keys only in [[datasets.subsets]], "dataset" keys in [general] or
# [[datasets]], "any" everywhere (inherited downwards).
SUBSET, DATASET, ANY = "subset", "dataset", "any"
NUMBER = (int, float)


@dataclass(frozen=True)
class Key:
    types: tuple
    level: str
    supported: bool
    default: Any = None
    why: str = ""  # for unsupported keys: what TuneKit does instead


def _unsupported(types, level, default, why):
    return Key(types, level, False, default, why)


KEYS: dict[str, Key] = {
    # applied
    "image_dir": Key((str,), SUBSET, True),
    "is_reg": Key((bool,), SUBSET, True, False),
    "alpha_mask": Key((bool,), SUBSET, True, False),
    "num_repeats": Key((int,), ANY, True, 1),
    "class_tokens": Key((str,), ANY, True, None),
    "caption_extension": Key((str,), ANY, True, ".caption"),
    "shuffle_caption": Key((bool,), ANY, True, False),
    "keep_tokens": Key((int,), ANY, True, 0),
    "keep_tokens_separator": Key((str,), ANY, True, ""),
    "caption_separator": Key((str,), ANY, True, ","),
    "secondary_separator": Key((str,), ANY, True, ""),
    "caption_prefix": Key((str,), ANY, True, ""),
    "caption_suffix": Key((str,), ANY, True, ""),
    "caption_dropout_rate": Key(NUMBER, ANY, True, 0.0),
    "caption_dropout_every_n_epochs": Key((int,), ANY, True, 0),
    "caption_tag_dropout_rate": Key(NUMBER, ANY, True, 0.0),
    "token_warmup_min": Key((int,), ANY, True, 1),
    "token_warmup_step": Key(NUMBER, ANY, True, 0),
    "flip_aug": Key((bool,), ANY, True, False),
    "random_crop": Key((bool,), ANY, True, False),
    "resize_interpolation": Key((str,), ANY, True, None),
    "resolution": Key((int, list), DATASET, True, None),
    "enable_bucket": Key((bool,), DATASET, True, False),
    "min_bucket_reso": Key((int,), DATASET, True, 256),
    "max_bucket_reso": Key((int,), DATASET, True, 1024),
    "bucket_reso_steps": Key((int,), DATASET, True, 64),
    "bucket_no_upscale": Key((bool,), DATASET, True, False),
    "prior_loss_weight": Key(NUMBER, DATASET, True, 1.0),
    # accounted for, not applied
    "batch_size": _unsupported((int,), DATASET, 1, "Train LoRA's batch_size is used"),
    "color_aug": _unsupported((bool,), ANY, False, "no colour augmentation yet"),
    "face_crop_aug_range": _unsupported((list,), ANY, None, "no face-crop augmentation yet"),
    "enable_wildcard": _unsupported((bool,), ANY, False, "wildcards are not expanded yet: captions are used as written"),
    "custom_attributes": _unsupported((dict,), ANY, None, "custom attributes are not used"),
    "cache_info": _unsupported((bool,), ANY, False, "TuneKit keeps its own image-size and latent caches"),
    "network_multiplier": _unsupported(NUMBER, DATASET, 1.0, "every dataset trains at multiplier 1"),
    "validation_seed": _unsupported((int,), ANY, None, "no validation split yet"),
    "validation_split": _unsupported(NUMBER, ANY, 0.0, "no validation split yet: every image trains"),
    "debug_dataset": _unsupported((bool,), DATASET, False, "use the Dataset Report node to look at the dataset"),
    "metadata_file": _unsupported((str,), SUBSET, None, "fine-tuning subsets are not supported yet"),
    "conditioning_data_dir": _unsupported((str,), SUBSET, None, "ControlNet subsets are not supported"),
}
# Unsupported keys that change what a subset is: refusing is better than training something else.
FATAL_UNSUPPORTED = {
    "metadata_file": "use image_dir with caption files, or an imagefolder metadata.jsonl (Dataset from Metadata)",
    "conditioning_data_dir": "TuneKit trains LoRAs on images and captions only",
}
TOP_LEVEL = ("general", "datasets")
DirResolver = Callable[[str, Path, str], Path]


def load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise DatasetError("Reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    from .captions import read_utf8

    text = read_utf8(path, "dataset config")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DatasetError(f"{path}: not valid TOML: {error}") from None


def key_lines(text: str) -> dict[tuple, int]:
    """Line of every key and table header: ('general', key), ('datasets', i[, key]),
    ('datasets', i, 'subsets', j[, key]). A plain scan: enough to point at a line."""
    lines, table = {}, ()
    counts = {"datasets": -1, "subsets": -1}
    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
    assignment = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        if match := header.match(line):
            name = match.group(2).replace(" ", "")
            if name == "datasets":
                counts["datasets"] += 1
                counts["subsets"] = -1
                table = ("datasets", counts["datasets"])
            elif name == "datasets.subsets":
                counts["subsets"] += 1
                table = ("datasets", counts["datasets"], "subsets", counts["subsets"])
            else:
                table = tuple(name.split("."))
            lines.setdefault(table, number)
        elif match := assignment.match(line):
            lines.setdefault(table + (match.group(1).strip("\"'"),), number)
    return lines


class _Reader:
    """Checks keys and values of one TOML file, collecting every problem with its line."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, key_lines(text)
        self.errors: list[str] = []
        self.notes: list[str] = []

    def where(self, place: tuple, key: str | None = None) -> str:
        line = self.lines.get(place + (key,) if key else place) or self.lines.get(place) or self._nearest(place)
        return f"{self.path}:{line}" if line else str(self.path)

    def _nearest(self, place: tuple) -> int | None:
        while place:
            place = place[:-1]
            if place in self.lines:
                return self.lines[place]
        return None

    def check_table(self, table: dict, place: tuple, level: str, label: str) -> dict:
        """The table's known keys with checked values; problems go to errors/notes."""
        checked = {}
        for key, value in table.items():
            if key == "subsets" and level == "datasets":
                continue
            spec = KEYS.get(key)
            if spec is None:
                self.errors.append(f"{self.where(place, key)}: unknown key '{key}' in {label}{self._suggest(key)}.")
            elif not self._placed(spec, level):
                target = "[[datasets.subsets]]" if spec.level == SUBSET else "[general] or [[datasets]]"
                self.errors.append(f"{self.where(place, key)}: '{key}' belongs in {target}, not in {label}.")
            elif not _type_ok(value, spec.types):
                wanted = " or ".join(t.__name__ for t in spec.types)
                self.errors.append(f"{self.where(place, key)}: '{key}' is {value!r}; it must be {wanted}.")
            else:
                self._report_unsupported(key, value, spec, place)
                checked[key] = value
        return checked

    def _placed(self, spec: Key, level: str) -> bool:
        if spec.level == SUBSET:
            return level == "subset"
        if spec.level == DATASET:
            return level in ("general", "datasets")
        return True

    def _report_unsupported(self, key, value, spec: Key, place: tuple) -> None:
        if spec.supported:
            return
        if key in FATAL_UNSUPPORTED:
            self.errors.append(f"{self.where(place, key)}: '{key}' is not supported by TuneKit ({spec.why}): "
                               f"{FATAL_UNSUPPORTED[key]}.")
            return
        effect = "no effect, it is kohya's default" if value == spec.default else spec.why
        self.notes.append(f"{self.where(place, key)}: '{key} = {_toml_value(value)}' is not supported by TuneKit "
                          f"and not applied ({effect}).")

    @staticmethod
    def _suggest(key: str) -> str:
        close = difflib.get_close_matches(key, list(KEYS) + ["subsets"], n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else " (not a kohya dataset key; see FORMATS.md)"


def _type_ok(value, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, tuple(t for t in types if t is not bool))


def read_kohya_toml(path: Path, resolve_dir: DirResolver | None = None) -> Dataset:
    """The dataset a kohya TOML describes. `resolve_dir(text, base, where)` turns an `image_dir` into a
    folder (the node layer checks allowed roots there); by default relative to the TOML's folder."""
    from .captions import read_utf8

    data = load_toml(path)
    reader = _Reader(path, read_utf8(path, "dataset config"))
    for key in data:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(key, TOP_LEVEL, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else " (only [general] and [[datasets]] are read)"
            reader.errors.append(f"{reader.where((key,))}: unknown table or key '{key}'{hint}.")
    general = reader.check_table(_table(data, "general", reader), ("general",), "general", "[general]")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        reader.errors.append(f"{path}: no [[datasets]]: add at least one [[datasets]] with a [[datasets.subsets]].")
        datasets = []
    plans = []
    for i, dataset in enumerate(datasets):
        plans.extend(_dataset_plans(reader, general, dataset, i))
    if reader.errors:
        raise DatasetError(f"{path} has {len(reader.errors)} problems:\n" + "\n".join(reader.errors))
    return _build(reader, plans, resolve_dir or _relative_to(path.parent))


def _table(data: dict, key: str, reader: _Reader) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        reader.errors.append(f"{reader.where((key,))}: '{key}' must be a table ([{key}]).")
        return {}
    return value


def _dataset_plans(reader: _Reader, general: dict, dataset, i: int) -> list[tuple[dict, tuple]]:
    place = ("datasets", i)
    if not isinstance(dataset, dict):
        reader.errors.append(f"{reader.where(place)}: each [[datasets]] entry must be a table.")
        return []
    merged = {**general, **reader.check_table(dataset, place, "datasets", f"[[datasets]] #{i + 1}")}
    subsets = dataset.get("subsets", [])
    if not subsets:
        reader.errors.append(f"{reader.where(place)}: [[datasets]] #{i + 1} has no [[datasets.subsets]] with an image_dir.")
    plans = []
    for j, subset in enumerate(subsets if isinstance(subsets, list) else []):
        subplace = place + ("subsets", j)
        label = f"[[datasets.subsets]] #{j + 1} of dataset #{i + 1}"
        values = {**merged, **reader.check_table(subset, subplace, "subset", label)}
        if "image_dir" not in subset and "metadata_file" not in subset:
            reader.errors.append(f"{reader.where(subplace)}: {label} has no image_dir: add image_dir = \"folder of images\".")
            continue
        reader.errors.extend(f"{reader.where(subplace)}: {problem}" for problem in _value_problems(values))
        plans.append((values, subplace))
    return plans


def _value_problems(values: dict) -> list[str]:
    found = []
    interpolation = values.get("resize_interpolation")
    if interpolation is not None and interpolation not in RESIZE_INTERPOLATIONS:
        found.append(f"resize_interpolation '{interpolation}' is not one of {', '.join(RESIZE_INTERPOLATIONS)}.")
    resolution = values.get("resolution")
    if isinstance(resolution, list) and (len(resolution) != 2 or not all(isinstance(v, int) for v in resolution)):
        found.append(f"resolution {resolution} must be one number or [width, height].")
    found.extend(_captions(values).problems())
    return found


def _relative_to(base: Path) -> DirResolver:
    def resolve(text: str, _base: Path, where: str) -> Path:
        return (base / Path(text).expanduser()).resolve()
    return resolve


def _build(reader: _Reader, plans: list[tuple[dict, tuple]], resolve_dir: DirResolver) -> Dataset:
    dataset, errors = Dataset([]), []
    for values, place in plans:
        where = reader.where(place, "image_dir")
        repeats = values.get("num_repeats", 1)
        if repeats < 1:
            reader.notes.append(f"{where}: subset ignored: num_repeats is {repeats} (kohya ignores it too).")
            continue
        try:
            folder = resolve_dir(values["image_dir"], reader.path.parent, where)
            part = _scan_subset(values, folder, where)
        except DatasetError as error:
            errors.append(f"{where}: {error}")
            continue
        dataset = dataset.merged(part)
    if errors:
        raise DatasetError(f"{reader.path}: {len(errors)} subsets cannot be read:\n" + "\n".join(errors))
    if not dataset.subsets:
        raise DatasetError(f"{reader.path}: no subset with images (every one was ignored; see the notes above).")
    dataset.notes[:0] = reader.notes
    return dataset


def _scan_subset(values: dict, folder: Path, where: str) -> Dataset:
    if not folder.is_dir():
        raise DatasetError(f"image_dir '{values['image_dir']}' is not a folder ({folder}).")
    is_reg = values.get("is_reg", False)
    return scan_image_folder(
        folder,
        caption_extension=values.get("caption_extension", ".caption"),
        missing_caption="use trigger word",
        first_line_only=True,
        name=f"{folder.name}{' (reg)' if is_reg else ''}",
        repeats=values.get("num_repeats", 1),
        class_tokens=values.get("class_tokens") or "",
        captions=_captions(values),
        augment=Augment(
            random_crop=values.get("random_crop", False),
            flip=values.get("flip_aug", False),
            interpolation=values.get("resize_interpolation"),
            alpha_mask=values.get("alpha_mask", False),
        ),
        buckets=_buckets(values),
        is_reg=is_reg,
        loss_weight=float(values.get("prior_loss_weight", 1.0)) if is_reg else 1.0,
        source=where,
    )


def _captions(values: dict) -> CaptionOptions:
    return CaptionOptions(
        shuffle=values.get("shuffle_caption", False),
        keep_tokens=values.get("keep_tokens", 0),
        keep_tokens_separator=values.get("keep_tokens_separator", ""),
        separator=values.get("caption_separator", ","),
        secondary_separator=values.get("secondary_separator", ""),
        prefix=values.get("caption_prefix", ""),
        suffix=values.get("caption_suffix", ""),
        dropout_rate=float(values.get("caption_dropout_rate", 0.0)),
        dropout_every_n_epochs=values.get("caption_dropout_every_n_epochs", 0),
        tag_dropout_rate=float(values.get("caption_tag_dropout_rate", 0.0)),
        token_warmup_min=values.get("token_warmup_min", 1),
        token_warmup_step=values.get("token_warmup_step", 0),
    )


def _buckets(values: dict) -> BucketSettings:
    resolution = values.get("resolution")
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    return BucketSettings(
        enabled=values.get("enable_bucket", False),
        resolution=tuple(resolution) if resolution else None,
        min_reso=values.get("min_bucket_reso"),  # unset: kohya's 256/1024, widened to the resolution
        max_reso=values.get("max_bucket_reso"),
        steps=values.get("bucket_reso_steps", 64),
        no_upscale=values.get("bucket_no_upscale", False),
    )


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
