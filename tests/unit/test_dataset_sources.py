"""Every source gives the one Dataset: folders (recursive, caption extension), imagefolder metadata,
kohya TOML, legacy `<repeats>_<class>` folders, graph images; awkward files never take a run down."""

import json

import numpy as np
import pytest
from PIL import Image

from tunekit.trainer.data import (
    dataset_from_pixels, export_kohya_toml, images as images_module, read_kohya_toml, scan_image_folder,
    scan_legacy_folders, scan_metadata_folder,
)
from tunekit.trainer.errors import DatasetError

from helpers import write_png

COLOURS = [(200, 20, 20), (20, 200, 20), (20, 20, 200)]


def three_images(folder, extension=".txt", sizes=((64, 64), (96, 64), (64, 128))):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (colour, size) in enumerate(zip(COLOURS, sizes)):
        write_png(folder / f"img{index}.png", colour=colour, size=size)
        (folder / f"img{index}{extension}").write_text(f"tkred, photo {index}")
    return folder


def items(dataset):
    """What training sees of each image: caption, displayed size and pixel content."""
    return sorted((i.caption, i.load().size, i.load().tobytes()) for i in dataset.images)


def test_awkward_images_load_or_are_listed_with_a_reason(tmp_path, monkeypatch):
    folder = tmp_path / "awkward"
    folder.mkdir()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png")
    Image.new("LA", (16, 16), (10, 0)).save(folder / "grey_alpha.png")
    Image.new("L", (16, 16), 128).save(folder / "grey.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (300, 300)).save(folder / "bomb.png")
    monkeypatch.setattr(images_module, "MAX_PIXELS", 50_000)
    dataset = scan_image_folder(folder, missing_caption="use trigger word", trigger_word="tk")
    sizes = {image.name: image.size for image in dataset.images}
    assert sizes == {"cmyk.jpg": (40, 30), "sixteen.png": (24, 20), "palette.png": (16, 16),
                     "grey_alpha.png": (16, 16), "grey.png": (16, 16), "rotated.jpg": (20, 40)}
    assert all(image.load().mode == "RGB" and image.load().size == image.size for image in dataset.images)
    assert dataset.images[[i.name for i in dataset.images].index("grey_alpha.png")].load().getpixel((0, 0)) == (255, 255, 255)
    reasons = {s.source.rsplit("/", 1)[-1]: s.reason for s in dataset.skipped}
    assert set(reasons) == {"truncated.jpg", "zero.png", "text.png", "bomb.png"}
    assert "truncated" in reasons["truncated.jpg"] and "0 bytes" in reasons["zero.png"]
    assert "not an image" in reasons["text.png"] and "larger than 50000 pixels" in reasons["bomb.png"]


def test_recursive_folder_with_a_caption_extension(tmp_path):
    three_images(tmp_path / "top" / "a", ".caption", sizes=((64, 64),) * 3)
    (tmp_path / "top" / "b").mkdir()
    write_png(tmp_path / "top" / "b" / "deep.png")
    (tmp_path / "top" / "b" / "deep.caption").write_text("deep one")
    (tmp_path / "top" / ".hidden").mkdir()
    write_png(tmp_path / "top" / ".hidden" / "x.png")
    flat = tmp_path / "top"
    with pytest.raises(DatasetError, match="No images in .* \\(looked for"):
        scan_image_folder(flat, ".caption")
    dataset = scan_image_folder(flat, ".caption", recursive=True)
    assert sorted(image.caption for image in dataset.images) == ["deep one", "tkred, photo 0", "tkred, photo 1", "tkred, photo 2"]


def test_caption_not_utf8_names_the_file_and_line(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("first line\nla caf\u00e9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"a\.txt:2: the caption is not UTF-8 text \(byte 0xe9.*Save the file as UTF-8"):
        scan_image_folder(tmp_path)


def test_duplicate_content_is_found(tmp_path):
    three_images(tmp_path)
    (tmp_path / "copy.png").write_bytes((tmp_path / "img0.png").read_bytes())
    (tmp_path / "copy.txt").write_text("same")
    dataset = scan_image_folder(tmp_path)
    digests = [image.digest for image in dataset.images]
    assert len(digests) == 4 and len(set(digests)) == 3


def write_metadata(folder, kind="jsonl", names=("img0.png", "img1.png", "img2.png")):
    rows = [{"file_name": name, "text": f"tkred, photo {i}"} for i, name in enumerate(names)]
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},\"{r['text']}\"\n" for r in rows))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_imagefolder_metadata(tmp_path, kind):
    folder = three_images(tmp_path / "hf")
    write_metadata(folder, kind)
    dataset = scan_metadata_folder(folder)
    assert items(dataset) == items(scan_image_folder(folder))


def test_metadata_naming_missing_files_says_file_and_line(tmp_path):
    folder = three_images(tmp_path / "hf")
    write_metadata(folder, names=("img0.png", "gone.png", "img2.png", "../escape.png"))
    with pytest.raises(DatasetError) as raised:
        scan_metadata_folder(folder)
    message = str(raised.value)
    assert "metadata.jsonl:2: file_name 'gone.png' does not exist" in message
    assert "metadata.jsonl:4: file_name '../escape.png' points outside the dataset folder" in message
    (folder / "metadata.jsonl").write_text('{"file_name": "img0.png", "caption": "x"}\n{broken\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: not a JSON object"):
        scan_metadata_folder(folder)
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1: no 'text' caption column \(columns: caption\)"):
        (folder / "metadata.jsonl").write_text('{"file_name": "img0.png", "caption": "x"}\n')
        scan_metadata_folder(folder)
    assert scan_metadata_folder(folder, caption_column="caption").images[0].caption == "x"


def test_legacy_repeats_class_folders(tmp_path):
    root = tmp_path / "train"
    three_images(root / "10_sks dog", ".caption")
    (root / "10_sks dog" / "img2.caption").unlink()
    three_images(root / "3_style_word", ".caption")
    (root / "not_a_subset").mkdir()
    dataset = scan_legacy_folders(root)
    assert [(s.name, s.repeats, s.class_tokens) for s in dataset.subsets] == [
        ("10_sks dog", 10, "sks dog"), ("3_style_word", 3, "style_word")]
    assert dataset.subsets[0].images[2].caption == "sks dog"  # no caption file: the class tokens
    assert any("not_a_subset" in note for note in dataset.notes)


def test_same_dataset_through_every_source_gives_the_same_items(tmp_path):
    folder = three_images(tmp_path / "5_tkred")
    write_metadata(folder)
    (tmp_path / "data.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "5_tkred"\nnum_repeats = 5\n')
    from_folder = scan_image_folder(folder)
    expected = items(from_folder)
    pixels = np.stack([np.asarray(image.load().resize((64, 64))) for image in from_folder.images])
    sources = {
        "metadata": scan_metadata_folder(folder),
        "toml": read_kohya_toml(tmp_path / "data.toml"),
        "legacy": scan_legacy_folders(tmp_path, caption_extension=".txt"),
        "export": read_kohya_toml(export_kohya_toml(from_folder, tmp_path / "export")),
    }
    for name, dataset in sources.items():
        assert items(dataset) == expected, name
    assert sources["toml"].subsets[0].repeats == sources["legacy"].subsets[0].repeats == 5
    graph = dataset_from_pixels(pixels, [i.caption for i in from_folder.images])
    assert [i.caption for i in graph.images] == [i.caption for i in from_folder.images]


def test_graph_images_with_masks_export_to_kohya_and_back(tmp_path):
    pixels = np.zeros((2, 32, 48, 3), dtype=np.uint8)
    pixels[1] = 255
    mask = np.zeros((16, 24), dtype=np.float32)
    mask[:, 12:] = 1
    dataset = dataset_from_pixels(pixels, ["one", "two"], mask)
    assert dataset.images[0].mask.shape == (32, 48) and dataset.images[0].size == (48, 32)
    with pytest.raises(DatasetError, match="3 masks for 2 images"):
        dataset_from_pixels(pixels, ["one", "two"], np.zeros((3, 32, 48)))
    back = read_kohya_toml(export_kohya_toml(dataset, tmp_path / "out"))
    assert [i.caption for i in back.images] == ["one", "two"]
    assert back.subsets[0].augment.alpha_mask
    assert [np.asarray(i.load(composite=False)).tobytes() for i in back.images] == [p.tobytes() for p in pixels]
