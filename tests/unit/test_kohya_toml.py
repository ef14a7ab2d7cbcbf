"""kohya dataset TOML: every documented key applied or reported, typos with the closest key, file:line."""

import pytest

from tunekit.trainer.data import read_kohya_toml
from tunekit.trainer.data.kohya_toml import KEYS
from tunekit.trainer.errors import DatasetError

from test_dataset_sources import three_images

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
DOCUMENTED = """alpha_mask, batch_size, bucket_no_upscale, bucket_reso_steps, cache_info, caption_dropout_every_n_epochs,
caption_dropout_rate, caption_extension, caption_prefix, caption_separator, caption_suffix, caption_tag_dropout_rate,
class_tokens, color_aug, conditioning_data_dir, custom_attributes, debug_dataset, enable_bucket, enable_wildcard,
face_crop_aug_range, flip_aug, image_dir, is_reg, keep_tokens, keep_tokens_separator, max_bucket_reso,
metadata_file, min_bucket_reso, network_multiplier, num_repeats, prior_loss_weight, random_crop,
resize_interpolation, resolution, secondary_separator, shuffle_caption, token_warmup_min, token_warmup_step,
validation_seed, validation_split"""


def test_every_documented_key_is_accounted_for():
    documented = {key.strip() for key in DOCUMENTED.replace("\n", " ").split(",")}
    assert set(KEYS) == documented
    fixture = (FIXTURES / "every_key.toml").read_text()
    missing = [key for key in documented - {"metadata_file", "conditioning_data_dir"} if f"{key} =" not in fixture]
    assert not missing, f"the fixture does not cover {missing}"


def copy_fixture(tmp_path, name="every_key.toml"):
    three_images(tmp_path / "train")
    three_images(tmp_path / "reg")
    path = tmp_path / name
    path.write_text((FIXTURES / name).read_text())
    return path


def test_the_every_key_fixture_applies_what_it_can_and_reports_the_rest(tmp_path):
    path = copy_fixture(tmp_path)
    dataset = read_kohya_toml(path)
    train, reg = dataset.subsets
    assert (train.repeats, train.class_tokens, train.is_reg, reg.is_reg, reg.loss_weight) == (4, "sks dog", False, True, 0.5)
    c = train.captions
    assert (c.shuffle, c.keep_tokens, c.keep_tokens_separator, c.secondary_separator, c.prefix, c.suffix) == (
        True, 1, "|||", ";;;", "photo of", "high quality")
    assert (c.dropout_rate, c.dropout_every_n_epochs, c.tag_dropout_rate, c.token_warmup_min, c.token_warmup_step) == (
        0.05, 3, 0.1, 2, 0.5)
    a = train.augment
    assert (a.random_crop, a.flip, a.interpolation, a.alpha_mask) == (True, True, "bicubic", True)
    assert reg.augment.random_crop is False
    b = train.buckets
    assert (b.enabled, b.resolution, b.min_reso, b.max_reso, b.steps, b.no_upscale) == (True, (96, 64), 64, 256, 32, False)
    notes = "\n".join(dataset.notes)
    for key, line in [("color_aug", 17), ("face_crop_aug_range", 19), ("custom_attributes", 20), ("validation_seed", 23),
                      ("batch_size", 29), ("network_multiplier", 35), ("enable_wildcard", 18), ("cache_info", 21),
                      ("debug_dataset", 22), ("validation_split", 24)]:
        assert f"every_key.toml:{line}: '{key} = " in notes, key
    assert "not supported by TuneKit and not applied (no colour augmentation yet)" in notes
    assert "'enable_wildcard = false' is not supported by TuneKit and not applied (no effect, it is kohya's default)" in notes


def test_typos_misplaced_keys_and_missing_image_dir_are_all_reported_with_lines(tmp_path):
    three_images(tmp_path / "train")
    path = tmp_path / "bad.toml"
    path.write_text(
        "[general]\n"
        "shuffle_captions = true\n"            # 2: typo
        "image_dir = 'train'\n"                # 3: subset key in general
        "[[datasets]]\n"                       # 4
        "resolution = 512\n"
        "[[datasets.subsets]]\n"               # 6: no image_dir
        "num_repeats = 2\n"
        "[[datasets.subsets]]\n"               # 8
        "image_dir = 'train'\n"
        "enable_bucket = true\n"               # 10: dataset key in a subset
        "keep_tokens = 'two'\n"                # 11: wrong type
        "[[dataset]]\n"                        # 12: unknown table
    )
    with pytest.raises(DatasetError) as raised:
        read_kohya_toml(path)
    message = str(raised.value)
    assert "bad.toml:2: unknown key 'shuffle_captions' in [general] (did you mean 'shuffle_caption'?)" in message
    assert "bad.toml:3: 'image_dir' belongs in [[datasets.subsets]], not in [general]" in message
    assert "bad.toml:6: [[datasets.subsets]] #1 of dataset #1 has no image_dir" in message
    assert "bad.toml:10: 'enable_bucket' belongs in [general] or [[datasets]]" in message
    assert "bad.toml:11: 'keep_tokens' is 'two'; it must be int" in message
    assert "bad.toml:12: unknown table or key 'dataset' (did you mean 'datasets'?)" in message


def test_image_dir_that_does_not_exist_and_a_resolver_that_refuses(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'nowhere'\n")
    with pytest.raises(DatasetError, match=r"d.toml:3: image_dir 'nowhere' is not a folder"):
        read_kohya_toml(path)

    def refuse(text, base, where):
        raise DatasetError(f"'{text}' is outside the allowed roots")

    three_images(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"d.toml:3: 'nowhere' is outside the allowed roots"):
        read_kohya_toml(path, refuse)


def test_fine_tuning_subsets_are_refused_and_bad_toml_points_at_the_line(tmp_path):
    path = tmp_path / "ft.toml"
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n")
    with pytest.raises(DatasetError, match=r"ft.toml:3: 'metadata_file' is not supported by TuneKit"):
        read_kohya_toml(path)
    path.write_text("[[datasets]]\nresolution = \n")
    with pytest.raises(DatasetError, match=r"ft.toml: not valid TOML: .*line 2"):
        read_kohya_toml(path)


def test_kohya_defaults_apply_when_keys_are_absent(tmp_path):
    folder = three_images(tmp_path / "imgs", ".caption")
    (folder / "img1.caption").unlink()
    path = tmp_path / "min.toml"
    path.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nclass_tokens = 'sks'\n")
    dataset = read_kohya_toml(path)
    subset = dataset.subsets[0]
    assert subset.caption_extension == ".caption" and subset.repeats == 1 and not subset.buckets.enabled
    assert [image.caption for image in subset.images] == ["tkred, photo 0", "sks", "tkred, photo 2"]
