"""Dataset folders: captions, triggers, and files that must not take a run down."""

import numpy as np
import pytest
from PIL import Image

from tunekit.trainer.data import fit_square, load_rgb, scan_image_folder
from tunekit.trainer.data.images import ImageLoadError
from tunekit.trainer.errors import DatasetError

from helpers import write_png


def captioned(folder, name, caption="a red square", **image):
    write_png(folder / f"{name}.png", **image)
    (folder / f"{name}.txt").write_text(caption)


def test_folder_with_captions_and_trigger(tmp_path):
    captioned(tmp_path, "a")
    captioned(tmp_path, "b", caption="tkred, already triggered")
    dataset = scan_image_folder(tmp_path, trigger_word="tkred")
    assert [image.caption for image in dataset.images] == ["tkred, a red square", "tkred, already triggered"]


def test_corrupt_and_empty_files_are_skipped_and_listed(tmp_path):
    captioned(tmp_path, "good")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    dataset = scan_image_folder(tmp_path, missing_caption="use trigger word")
    assert len(dataset) == 1
    reasons = {item.source.rsplit("/", 1)[-1]: item.reason for item in dataset.skipped}
    assert set(reasons) == {"broken.png", "empty.jpg"}
    assert "0 bytes" in reasons["empty.jpg"]


def test_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="No images in .*Put your training images there"):
        scan_image_folder(tmp_path)


def test_missing_captions_error_lists_files_and_the_fix(tmp_path):
    captioned(tmp_path, "a")
    write_png(tmp_path / "nocap.png")
    with pytest.raises(DatasetError, match=r"1 images have no caption file \(.txt\): nocap.png.*'use trigger word'"):
        scan_image_folder(tmp_path)


def test_missing_captions_policy_uses_the_trigger_word(tmp_path):
    write_png(tmp_path / "nocap.png")
    dataset = scan_image_folder(tmp_path, trigger_word="tkred", missing_caption="use trigger word")
    assert dataset.images[0].caption == "tkred"


def test_transparency_is_composited_on_white(tmp_path):
    path = write_png(tmp_path / "alpha.png", colour=(255, 0, 0, 0), mode="RGBA")
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_non_image_is_refused_with_a_reason(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_rgb(tmp_path / "notes.png")


def test_fit_square_crops_the_centre_and_records_sizes():
    image = Image.fromarray(np.zeros((100, 200, 3), dtype=np.uint8))
    pixels, size = fit_square(image, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.float32
    assert size.original == (100, 200) and size.target == (64, 64) and size.crop_top_left == (0, 32)
