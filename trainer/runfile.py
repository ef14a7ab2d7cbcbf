"""The run file: a TOML with everything to re-run a training run headless (`tunekit train --config run.toml`).

The flat TrainConfig keys (what `TrainConfig.to_toml` writes next to every artefact) plus a `[run]` table:
which checkpoint, which dataset (a folder of images with caption files, or a kohya dataset TOML), where the
run's folder goes and its name; optionally a `[validation]` table (Sample & Validate's validation loss,
patience and keep_best: what decides where a run stops and which weights it keeps). Train LoRA writes the
same file (config.toml in output/tunekit/<run>/ and in every step_* folder), so a run started in the graph
re-runs headless as is. Relative paths are relative to
the run file's folder. Everything is checked at once; each problem names its key, the value and the fix.
"""

import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from .config import TrainConfig, _toml_value
from .embeddings import embedding_problems
from .errors import ConfigError
from .monitor import MonitorSettings

RUN_TABLE = "run"
# [run] keys: what each holds, for the messages.
RUN_KEYS = {
    "method": "'lora' (Train LoRA), 'finetune' (Fine-tune: every UNet weight, and every text-encoder weight with "
              "text_encoders, saved as a checkpoint) or 'embedding' (Train Embedding: textual inversion of init_word / "
              "num_vectors; pivotal = true adds a UNet LoRA)",
    "name": "the run's name (its folder and the LoRA or checkpoint file)",
    "checkpoint": "the model checkpoint (.safetensors / .ckpt) ComfyUI loads",
    "dataset": "a folder of images with caption files, or a kohya dataset .toml",
    "output_dir": "the folder that gets the run folder",
    "caption_extension": "caption files' extension, for a dataset folder",
    "trigger_word": "put in front of every caption of a dataset folder",
}
METHODS = ("lora", "finetune", "embedding")
RUN_DEFAULTS = {"method": "lora", "name": "tunekit_lora", "checkpoint": "", "dataset": "", "output_dir": ".", "caption_extension": ".txt",
                "trigger_word": ""}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$")
CONFIG_FIELDS = {field.name: field for field in fields(TrainConfig)}
VALIDATION_TABLE = "validation"
MONITOR_FIELDS = {field.name: field for field in fields(MonitorSettings)}
# [validation] keys: MonitorSettings' fields, plus a separate validation set.
VALIDATION_KEYS = {**MONITOR_FIELDS, "dataset": "a separate validation set: a folder of images with caption files, or a "
                                                "kohya dataset .toml (instead of validation_count)"}


@dataclass(frozen=True)
class RunFile:
    path: Path
    config: TrainConfig
    method: str
    name: str
    checkpoint: Path
    dataset: Path
    output_dir: Path
    caption_extension: str
    trigger_word: str
    validation: MonitorSettings | None = None
    validation_dataset: Path | None = None

    def run_table(self) -> str:
        """The `[run]` (and `[validation]`) table of this run, absolute paths: written into every config.toml the
        run saves."""
        table = run_table(self.name, self.checkpoint, self.dataset, self.caption_extension, self.trigger_word,
                          self.output_dir, self.method)
        return table + (validation_table(self.validation, self.validation_dataset) if self.validation else "")


def run_table(name: str, checkpoint: Path | None, dataset: Path | None, caption_extension: str = ".txt",
              trigger_word: str = "", output_dir: Path | None = None, method: str = "lora") -> str:
    values = {"method": method, "name": name, "checkpoint": str(checkpoint or ""), "dataset": str(dataset or ""),
              "caption_extension": caption_extension, "trigger_word": trigger_word}
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return f"\n[{RUN_TABLE}]  # tunekit train --config <this file> re-runs it headless\n" + "\n".join(lines) + "\n"


def validation_table(settings: MonitorSettings, dataset: Path | None = None) -> str:
    lines = [f"{name} = {_toml_value(getattr(settings, name))}" for name in MONITOR_FIELDS]
    if dataset is not None:
        lines.append(f"dataset = {_toml_value(str(dataset))}")
    return f"\n[{VALIDATION_TABLE}]  # the validation loss that decides where the run stops (no samples headless)\n" \
        + "\n".join(lines) + "\n"


def read_run_file(path: Path, overrides: dict | None = None) -> RunFile:
    """The run `path` describes, `overrides` (run keys from the command line) winning; every problem at once."""
    data = _load(path)
    run, problems = _table(path, data, RUN_TABLE, {})
    validation, validation_problems = _table(path, data, VALIDATION_TABLE, None)
    problems += validation_problems + _unknown_keys(path, data, CONFIG_FIELDS, "")
    problems += _unknown_keys(path, run, RUN_KEYS, f"{RUN_TABLE}.")
    problems += _unknown_keys(path, validation or {}, VALIDATION_KEYS, f"{VALIDATION_TABLE}.")
    problems += _config_type_problems(path, data) + _run_type_problems(path, run)
    problems += _validation_type_problems(path, validation or {})
    if problems:
        raise ConfigError(problems)
    config = TrainConfig.from_dict(data)
    values = {**RUN_DEFAULTS, **run, **{key: value for key, value in (overrides or {}).items() if value is not None}}
    base = path.parent
    resolved = {key: _resolve(base, values[key]) for key in ("checkpoint", "dataset", "output_dir")}
    settings, validation_dataset = _validation(base, validation)
    problems = config.problems() + _run_problems(path, values, resolved) + _method_problems(values, config)
    problems += _validation_problems(path, settings, validation_dataset)
    if problems:
        raise ConfigError(problems)
    return RunFile(path, config, values["method"], values["name"], resolved["checkpoint"], resolved["dataset"], resolved["output_dir"],
                   values["caption_extension"], values["trigger_word"], settings, validation_dataset)


def _table(path: Path, data: dict, name: str, default):
    """(the table `name` popped from `data`, or `default`; its problems)."""
    table = data.pop(name, default)
    if table is default or isinstance(table, dict):
        return table, []
    return default, [f"'{name}' in {path} must be a table ([{name}])."]


def _validation(base: Path, table: dict | None) -> tuple[MonitorSettings | None, Path | None]:
    if table is None:
        return None, None
    settings = MonitorSettings(**{key: value for key, value in table.items() if key in MONITOR_FIELDS})
    return settings, _resolve(base, table.get("dataset", ""))


def _validation_type_problems(path: Path, table: dict) -> list[str]:
    found = [f"{VALIDATION_TABLE}.{key} is {value!r} in {path}: it must be {_type_words(type(MONITOR_FIELDS[key].default))}."
             for key, value in table.items() if key in MONITOR_FIELDS and not _fits(value, type(MONITOR_FIELDS[key].default))]
    if not isinstance(table.get("dataset", ""), str):
        found.append(f"{VALIDATION_TABLE}.dataset is {table['dataset']!r} in {path}: it must be a string (in quotes).")
    return found


def _validation_problems(path: Path, settings: MonitorSettings | None, dataset: Path | None) -> list[str]:
    if settings is None:
        return []
    found = [f"{VALIDATION_TABLE}.{problem}" for problem in settings.problems()]
    if dataset is not None and settings.validation_count:
        found.append(f"{VALIDATION_TABLE}: validation_count is {settings.validation_count} and dataset is set: use one.")
    elif dataset is None and not settings.validation_count:
        found.append(f"{VALIDATION_TABLE} in {path} validates nothing: set validation_count (images held out of the "
                     f"dataset) or dataset (a separate validation set).")
    elif dataset is not None and not (dataset.is_dir() or (dataset.is_file() and dataset.suffix.lower() == ".toml")):
        found.append(f"{VALIDATION_TABLE}.dataset is '{dataset}': {VALIDATION_KEYS['dataset']} is needed (that path is neither).")
    return found


def _load(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError([f"cannot read the run file {path} ({error.strerror or error}): check the --config path."]) from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path} is not valid TOML ({error}): fix the line it names."]) from error


def _unknown_keys(path: Path, table: dict, known, prefix: str) -> list[str]:
    found = []
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else "remove it (see README: Headless training)"
            found.append(f"unknown key '{prefix}{key}' in {path}: {hint}")
    return found


def _config_type_problems(path: Path, data: dict) -> list[str]:
    found = []
    for key, value in data.items():
        if key in CONFIG_FIELDS and not _fits(value, type(CONFIG_FIELDS[key].default)):
            wanted = type(CONFIG_FIELDS[key].default)
            found.append(f"{key} is {value!r} in {path}: it must be {_type_words(wanted)}, e.g. "
                         f"{key} = {_toml_value(CONFIG_FIELDS[key].default)}.")
    return found


def _run_type_problems(path: Path, run: dict) -> list[str]:
    return [f"{RUN_TABLE}.{key} is {value!r} in {path}: it must be a string (in quotes)."
            for key, value in run.items() if key in RUN_KEYS and not isinstance(value, str)]


def _fits(value, wanted: type) -> bool:
    if wanted is bool or isinstance(value, bool):
        return isinstance(value, wanted)
    if wanted is float:
        return isinstance(value, (int, float))
    return isinstance(value, wanted)


def _type_words(wanted: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string (in quotes)"}[wanted]


def _resolve(base: Path, text: str) -> Path | None:
    return (base / Path(text).expanduser()).resolve() if text else None


def _method_problems(values: dict, config: TrainConfig) -> list[str]:
    """What the method needs of the settings: textual inversion an embedding name ([run] name), an init word
    and a vector count."""
    if values["method"] == "embedding":
        return embedding_problems(values["name"], config.init_word, config.num_vectors)
    if config.pivotal:
        return [(f"pivotal is true but {RUN_TABLE}.method is {values['method']!r}: pivotal tuning trains an embedding "
                 f"and a LoRA together: set method = \"embedding\" (with init_word), or pivotal = false.")]
    return []


def _run_problems(path: Path, values: dict, resolved: dict) -> list[str]:
    found = []
    if values["method"] not in METHODS:
        found.append(f"{RUN_TABLE}.method is {values['method']!r}: choose one of {', '.join(METHODS)}.")
    if not SAFE_NAME.match(values["name"]):
        found.append(f"{RUN_TABLE}.name is {values['name']!r}: use letters, digits, spaces, '_', '-' and '.', "
                     f"e.g. name = \"my_lora\".")
    checkpoint, dataset = resolved["checkpoint"], resolved["dataset"]
    if checkpoint is None:
        found.append(f"{RUN_TABLE}.checkpoint is not set in {path} ({RUN_KEYS['checkpoint']}): set it there or pass "
                     f"--checkpoint PATH (a run file from a graph whose MODEL was not loaded straight from a "
                     f"checkpoint file leaves it empty).")
    elif not checkpoint.is_file():
        found.append(f"{RUN_TABLE}.checkpoint is '{checkpoint}', which is not a file: give the checkpoint's path.")
    if dataset is None:
        found.append(f"{RUN_TABLE}.dataset is not set in {path} ({RUN_KEYS['dataset']}): set it there or pass --dataset PATH.")
    elif not (dataset.is_dir() or (dataset.is_file() and dataset.suffix.lower() == ".toml")):
        found.append(f"{RUN_TABLE}.dataset is '{dataset}': {RUN_KEYS['dataset']} is needed (that path is neither).")
    if not values["caption_extension"].startswith("."):
        found.append(f"{RUN_TABLE}.caption_extension is {values['caption_extension']!r}: start it with a dot, e.g. \".txt\".")
    return found
