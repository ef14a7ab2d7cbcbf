"""Bucket assignment matches kohya sd-scripts on a table of sizes.

The expected values were produced by running sd-scripts' own `BucketManager` and `make_bucket_resolutions`
(main, Feb 2026) on these sizes; TuneKit's port must give the same buckets and resize sizes, and report
what kohya crashes on.
"""

import pytest

from tunekit.trainer.data.buckets import BucketSettings, BucketTable, TooSmall, make_bucket_resolutions

SIZES = [(512, 512), (768, 512), (512, 768), (1920, 1080), (1080, 1920), (4096, 64), (64, 4096), (8, 8),
         (1000, 333), (600, 400), (333, 1000), (1024, 1024), (517, 389), (3000, 2000), (100, 700)]

# kohya BucketManager(no_upscale, max_reso, min_size, max_size, reso_steps) -> [(bucket, resized)] per size
KOHYA = {
    (False, 512, 256, 1024, 64): [
        ((512, 512), (512, 512)), ((640, 384), (640, 427)), ((384, 640), (427, 640)), ((640, 384), (683, 384)),
        ((384, 640), (384, 683)), ((1024, 256), (16384, 256)), ((256, 1024), (256, 16384)), ((512, 512), (512, 512)),
        ((832, 256), (832, 277)), ((640, 384), (640, 427)), ((256, 832), (277, 832)), ((512, 512), (512, 512)),
        ((576, 448), (595, 448)), ((640, 384), (640, 427)), ((256, 1024), (256, 1792))],
    (True, 512, 256, 1024, 64): [
        ((512, 512), (512, 512)), ((576, 384), (576, 384)), ((384, 576), (384, 576)), ((640, 384), (683, 384)),
        ((384, 640), (384, 683)), ((4096, 64), (4096, 64)), ((64, 4096), (64, 4096)), None,
        ((768, 256), (769, 256)), ((576, 384), (600, 400)), ((256, 768), (256, 769)), ((512, 512), (512, 512)),
        ((512, 384), (517, 389)), ((576, 384), (576, 384)), ((64, 640), (100, 700))],
    (False, 1024, 256, 2048, 64): [
        ((1024, 1024), (1024, 1024)), ((1216, 832), (1248, 832)), ((832, 1216), (832, 1248)),
        ((1344, 768), (1365, 768)), ((768, 1344), (768, 1365)), ((2048, 256), (16384, 256)),
        ((256, 2048), (256, 16384)), ((1024, 1024), (1024, 1024)), ((1728, 576), (1730, 576)),
        ((1216, 832), (1248, 832)), ((576, 1728), (576, 1730)), ((1024, 1024), (1024, 1024)),
        ((1152, 896), (1191, 896)), ((1216, 832), (1248, 832)), ((320, 2048), (320, 2240))],
    (True, 1024, 256, 2048, 32): [
        ((512, 512), (512, 512)), ((768, 512), (768, 512)), ((512, 768), (512, 768)), ((1344, 768), (1365, 768)),
        ((768, 1344), (768, 1365)), ((4096, 64), (4096, 64)), ((64, 4096), (64, 4096)), None,
        ((992, 320), (1000, 333)), ((576, 384), (600, 400)), ((320, 992), (333, 1000)), ((1024, 1024), (1024, 1024)),
        ((512, 384), (517, 389)), ((1248, 832), (1248, 832)), ((96, 672), (100, 700))],
}


@pytest.mark.parametrize("settings", list(KOHYA), ids=lambda s: f"no_upscale={s[0]}-res{s[1]}-max{s[3]}-step{s[4]}")
def test_assignments_match_kohya(settings):
    no_upscale, resolution, low, high, steps = settings
    table = BucketTable(BucketSettings(True, None, low, high, steps, no_upscale), (resolution, resolution))
    for size, expected in zip(SIZES, KOHYA[settings]):
        if expected is None:  # kohya divides by zero here; TuneKit says why
            with pytest.raises(TooSmall, match="smaller than the bucket step"):
                table.assign(*size)
            continue
        got = table.assign(*size)
        assert (got.bucket, got.resized) == expected, size


def test_sd15_bucket_list_is_kohyas():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_without_buckets_every_image_covers_the_square_and_is_centre_cropped():
    table = BucketTable(BucketSettings(enabled=False), (512, 512))
    assert table.assign(1920, 1080).bucket == (512, 512)
    assert table.assign(1920, 1080).resized == (910, 512)


def test_defaults_widen_to_a_small_resolution_and_bad_settings_are_explained():
    assert BucketSettings().limits((64, 64)) == (64, 1024)
    assert BucketSettings(min_reso=250, max_reso=1000).limits((512, 512)) == (192, 1024)  # kohya's rounding
    assert any("bucket_reso_steps is 60" in p for p in BucketSettings(steps=60).problems((512, 512)))
    problems = BucketSettings(min_reso=768, max_reso=384).problems((512, 512))
    assert any("min_bucket_reso 768 is larger than the resolution" in p for p in problems)
    assert any("max_bucket_reso 384 is smaller than the resolution" in p for p in problems)
