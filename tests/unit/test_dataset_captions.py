"""Captions of a dataset in the graph: changed as a new Dataset (files untouched), saved to sidecars only
when asked, atomically, never replacing an existing file in 'only missing' mode."""

import numpy as np
import pytest

from tunekit.trainer.captions import ops
from tunekit.trainer.captions.dataset_captions import map_captions, save_captions
from tunekit.trainer.data import scan_image_folder
from tunekit.trainer.data.graph import dataset_from_pixels
from tunekit.trainer.errors import TuneKitError

from helpers import write_png


def folder_dataset(folder, captions):
    """Images a.png, b.png, ... with the given captions (None: no caption file)."""
    folder.mkdir(exist_ok=True)
    for name, caption in captions.items():
        write_png(folder / f"{name}.png")
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return scan_image_folder(folder, ".txt", "", "use trigger word")


def test_map_captions_returns_a_new_dataset_and_what_changed(tmp_path):
    dataset = folder_dataset(tmp_path / "d", {"a": "dog, red", "b": "cat"})
    changed, changes = map_captions(dataset, lambda image: ops.remove_tags(image.caption, ["red"]))
    assert [i.caption for i in changed.images] == ["dog", "cat"]
    assert [(c.image, c.before, c.after) for c in changes] == [("a.png", "dog, red", "dog")]
    assert [i.caption for i in dataset.images] == ["dog, red", "cat"]  # the input dataset is unchanged
    assert (tmp_path / "d" / "a.txt").read_text() == "dog, red"  # so are the files
    assert changed.images[1] is dataset.images[1]


def test_only_missing_creates_new_sidecars_and_keeps_existing_ones(tmp_path):
    folder = tmp_path / "d"
    dataset = folder_dataset(folder, {"a": "dog", "b": None, "c": "cat"})
    edited, _ = map_captions(dataset, lambda image: ops.add_trigger(image.caption, "sks"))
    before = (folder / "a.txt").stat().st_mtime_ns
    report = save_captions(edited, "only missing")
    assert report.created == [str(folder / "b.txt")] and (folder / "b.txt").read_text() == "sks"
    assert report.kept == [str(folder / "a.txt"), str(folder / "c.txt")]
    assert (folder / "a.txt").read_text() == "dog" and (folder / "a.txt").stat().st_mtime_ns == before
    assert "Kept 2 existing caption files" in report.summary() and "'overwrite'" in report.summary()


def test_overwrite_replaces_only_what_differs_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "d"
    dataset = folder_dataset(folder, {"a": "dog", "b": "cat"})
    edited, _ = map_captions(dataset, lambda image: image.caption.replace("dog", "puppy"))
    report = save_captions(edited, "overwrite")
    assert report.overwritten == [str(folder / "a.txt")] and report.unchanged == [str(folder / "b.txt")]
    assert (folder / "a.txt").read_text() == "puppy"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt"]


def test_a_refused_path_writes_nothing(tmp_path):
    folder = tmp_path / "d"
    dataset = folder_dataset(folder, {"a": None, "b": None})

    def refuse_b(path):
        if path.name == "b.txt":
            raise TuneKitError("outside")

    with pytest.raises(TuneKitError, match="outside"):
        save_captions(dataset, "overwrite", check_path=refuse_b)
    assert not (folder / "a.txt").exists()


def test_graph_images_have_no_sidecar_and_a_bad_mode_is_refused(tmp_path):
    dataset = dataset_from_pixels(np.zeros((2, 8, 8, 3), np.uint8), ["x", "y"])
    report = save_captions(dataset, "overwrite")
    assert report.no_file == ["graph image 0", "graph image 1"] and "Save Dataset as kohya TOML" in report.summary()
    with pytest.raises(TuneKitError, match="'always'.*only missing, overwrite"):
        save_captions(dataset, "always")
