"""Caption sidecars of a folder (read all, write changed ones atomically) and cached thumbnails."""
import os

import pytest
from PIL import Image

from trainer.captions.sidecars import (
    CaptionsChangedOnDisk,
    PathOutsideFolder,
    checked_extension,
    image_in_folder,
    read_folder_captions,
    write_captions,
)
from trainer.data.images import ImageLoadError
from trainer.data.thumbnails import thumbnail
from trainer.errors import DatasetError


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.new("RGB", (300, 200), "red").save(folder / name)
    (folder / "a.txt").write_text("sks dog, grass\n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"caf\xe9")  # latin-1: not UTF-8
    return folder


def test_reads_every_image_with_its_caption_and_why_one_cannot_be_read(folder, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (folder / "link.png").symlink_to(outside)
    entries = read_folder_captions(folder)
    assert [(e.image, e.caption, e.has_file) for e in entries] == [("a.png", "sks dog, grass", True), ("b.jpg", "", True)]
    assert "not UTF-8" in entries[1].error and not entries[0].error
    assert [e.image for e in read_folder_captions(folder, recursive=True)] == ["a.png", "b.jpg", "sub/c.png"]


def test_writes_only_changed_captions_and_refuses_names_leading_out(folder, tmp_path):
    stamp = (folder / "a.txt").stat().st_mtime_ns
    result = write_captions(folder, {"a.png": "sks dog, grass", "sub/c.png": "new", "b.jpg": "café"})
    assert (result.written, result.unchanged) == (["sub/c.png", "b.jpg"], ["a.png"])
    assert (folder / "a.txt").stat().st_mtime_ns == stamp
    assert (folder / "sub" / "c.txt").read_text(encoding="utf-8") == "new"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "café"
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    for name in ("../x.png", str(tmp_path / "x.png"), "sub/../../x.png"):
        with pytest.raises(PathOutsideFolder):
            write_captions(folder, {"a.png": "changed", name: "x"})
    with pytest.raises(DatasetError, match="not an image"):
        image_in_folder(folder, "a.txt")
    assert (folder / "a.txt").read_text() == "sks dog, grass\n"  # a bad name anywhere: nothing written
    assert not [p for p in folder.rglob(".*")]


def test_caption_extension_is_checked():
    assert checked_extension("caption") == ".caption" and checked_extension(".txt") == ".txt"
    for bad in ("", ".png", "../x", ".t/xt"):
        with pytest.raises(DatasetError):
            checked_extension(bad)


def test_thumbnails_are_cached_by_path_size_and_mtime(folder, tmp_path):
    cache = tmp_path / "cache"
    first = thumbnail(folder / "a.png", cache, 128)
    with Image.open(first) as image:
        assert image.format == "WEBP" and image.size == (128, 85)
    made = first.stat().st_mtime_ns
    assert thumbnail(folder / "a.png", cache, 128) == first and first.stat().st_mtime_ns == made
    Image.new("RGB", (100, 300), "blue").save(folder / "a.png")
    os.utime(folder / "a.png", ns=(made + 10**9, made + 10**9))
    second = thumbnail(folder / "a.png", cache, 128)
    assert second != first
    with Image.open(second) as image:
        assert image.size == (43, 128)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError):
        thumbnail(folder / "broken.png", cache, 128)
    with pytest.raises(ValueError):
        thumbnail(folder / "a.png", cache, 100)


def test_symlinks_in_subfolders_leading_out_are_left_out(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (4, 4)).save(elsewhere / "d.png")
    (folder / "sub" / "inner").symlink_to(elsewhere)  # a linked folder
    (folder / "sub" / "e.png").symlink_to(elsewhere / "d.png")  # a linked image
    (folder / "sub" / "f.png").symlink_to(folder / "a.png")  # a link that stays inside
    names = [e.image for e in read_folder_captions(folder, recursive=True)]
    assert names == ["a.png", "b.jpg", "sub/c.png", "sub/f.png"], names


def test_a_caption_changed_on_disk_since_it_was_read_is_not_overwritten(folder):
    (folder / "a.txt").write_text("written by Auto Caption", encoding="utf-8")
    with pytest.raises(CaptionsChangedOnDisk, match="changed on disk") as raised:
        write_captions(folder, {"a.png": "my edit", "sub/c.png": "new"}, expected={"a.png": "sks dog, grass", "sub/c.png": ""})
    assert raised.value.images == ["a.png"] and not (folder / "sub" / "c.txt").exists()
    assert (folder / "a.txt").read_text(encoding="utf-8") == "written by Auto Caption"
    written = write_captions(folder, {"a.png": "my edit"}, expected={"a.png": "written by Auto Caption"}).written
    assert written == ["a.png"] and (folder / "a.txt").read_text(encoding="utf-8") == "my edit"
