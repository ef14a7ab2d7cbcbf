"""Hugging Face `imagefolder` datasets: images plus `metadata.jsonl` or `metadata.csv` naming each image
(`file_name`, relative to the metadata file) with its caption in a column (`text` by default)."""

import csv
import io
import json
from pathlib import Path

from ..errors import DatasetError
from .captions import read_utf8, with_trigger
from .dataset import Dataset, Subset, TrainImage
from .folder import list_images, probe_files

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def find_metadata(folder: Path) -> Path:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(
        f"No metadata.jsonl or metadata.csv in '{folder}'. An imagefolder dataset has one, with a 'file_name' "
        "column and a caption column, e.g. {\"file_name\": \"0001.png\", \"text\": \"a red square\"}."
    )


def read_metadata_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every record of a metadata.jsonl / metadata.csv."""
    text = read_utf8(path, "metadata file")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{number}: not a JSON object ({error.msg}). Each line holds one record.") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}.")
            rows.append((number, record))
        return rows
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for record in reader:
        rows.append((reader.line_num, record))
    return rows


def scan_metadata_folder(
    folder: Path, caption_column: str = "text", trigger_word: str = "", metadata: Path | None = None, **subset
) -> Dataset:
    """One subset from an imagefolder dataset. Every problem (missing column, missing or escaping files)
    is reported at once with the metadata file and line."""
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder not found: '{folder}'. Pick the folder that holds metadata.jsonl.")
    metadata = metadata or find_metadata(folder)
    rows = read_metadata_rows(metadata)
    entries, problems = _entries(metadata, rows, caption_column)
    if problems:
        raise DatasetError(f"{metadata} has {len(problems)} problems:\n" + "\n".join(problems))
    if not entries:
        raise DatasetError(f"{metadata} names no images: add one record per image.")
    probes, skipped = probe_files([path for path, _ in entries])
    images = [
        TrainImage(str(path), with_trigger(caption, trigger_word), size=probes[path].size, digest=probes[path].digest)
        for path, caption in entries if path in probes
    ]
    if not images:
        raise DatasetError(f"None of the {len(entries)} images named in {metadata} could be read; see the skipped list.")
    named = {path for path, _ in entries}
    unnamed = [p for p in list_images(metadata.parent, recursive=True) if p not in named]
    notes = [f"{len(unnamed)} images in '{metadata.parent}' are not in {metadata.name} and are not used"] if unnamed else []
    subset.setdefault("source", str(metadata))
    return Dataset([Subset(subset.pop("name", folder.name), images, **subset)], skipped, notes)


def _entries(metadata: Path, rows: list[tuple[int, dict]], caption_column: str):
    base = metadata.parent.resolve()
    entries, problems = [], []
    for line, record in rows:
        where = f"{metadata}:{line}"
        name, caption = record.get("file_name"), record.get(caption_column)
        if not name:
            problems.append(f"{where}: no 'file_name' (columns: {', '.join(record) or 'none'}).")
            continue
        if caption is None:
            columns = ", ".join(key for key in record if key != "file_name")
            problems.append(f"{where}: no '{caption_column}' caption column (columns: {columns}). "
                            "Set caption_column to the column that holds the captions.")
            continue
        path = (base / str(name)).resolve()
        if not path.is_relative_to(base):
            problems.append(f"{where}: file_name '{name}' points outside the dataset folder.")
        elif not path.is_file():
            problems.append(f"{where}: file_name '{name}' does not exist in '{base}'.")
        else:
            entries.append((path, " ".join(str(caption).split())))
    return entries, problems
