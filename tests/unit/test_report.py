"""The dataset report: stats per subset and bucket, steps per epoch, tags, everything skipped and why; a preview grid."""

from PIL import Image

from tunekit.trainer.data import BucketSettings, plan_dataset, scan_image_folder
from tunekit.trainer.data.report import dataset_report, preview_grid

from test_dataset_sources import three_images


def test_report_counts_buckets_steps_tags_and_problems(tmp_path):
    folder = three_images(tmp_path / "d", sizes=((64, 64), (256, 64), (64, 64)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "copy.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "copy.txt").write_text("tkred, photo 0")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("tiny")
    dataset = scan_image_folder(folder, repeats=3, buckets=BucketSettings(min_reso=64))
    text = dataset_report(dataset, 128, batch_size=2)
    assert "5 images in 1 subsets; 5 train, 0 fit no bucket, 1 unreadable." in text
    assert "5 images x 3 repeats = 15 per epoch" in text
    assert "- 128x128: 4 images, 12 with repeats, 6 batches" in text and "- 256x64: 1 images, 3 with repeats, 2 batches" in text
    assert "Steps per epoch at batch size 2: 8" in text
    assert "tkred (4)" in text and "1 groups of identical images: copy.png = img0.png" in text
    assert "enlarged more than 2x" in text and "tiny.png 8x8" in text
    assert "broken.png: not an image file PIL can read" in text


def test_preview_grid_shows_the_items(tmp_path):
    plan = plan_dataset(scan_image_folder(three_images(tmp_path / "d")), 64)
    grid = preview_grid(plan, count=3, cell=96, columns=2)
    assert grid.shape == (2 * (96 + 44), 2 * 96, 3) and grid.min() < 0.5 < grid.max() <= 1.0
