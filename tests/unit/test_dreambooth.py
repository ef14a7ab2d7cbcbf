"""DreamBooth datasets and the class-image cache (the sampling itself is tested in the real ComfyUI)."""

from dataclasses import replace

import numpy as np
import pytest

from tunekit.trainer.class_images import ClassImageCache, ClassImageSettings
from tunekit.trainer.data import Dataset, TrainImage, plan_dataset
from tunekit.trainer.dreambooth import dreambooth_dataset
from tunekit.trainer.errors import DatasetError

from helpers import solid_dataset

SETTINGS = ClassImageSettings("a photo of a dog", "", 7, 20, 7.0, "euler", "normal", 64, 64, "model-a")


def class_dataset(count: int) -> Dataset:
    images = [TrainImage(f"graph image c{i}", "dog", np.full((64, 64, 3), 90, np.uint8)) for i in range(count)]
    return Dataset.from_images(images, name="class")


def test_instance_images_take_the_instance_prompt_and_class_images_become_weighted_regularization():
    dataset = dreambooth_dataset(solid_dataset(2), "sks dog", class_dataset(3), "a photo of a dog", True, 0.5)
    instance, regularization = dataset.subsets
    assert {image.caption for image in instance.images} == {"sks dog"} and not instance.is_reg
    assert {image.caption for image in regularization.images} == {"a photo of a dog"}
    assert regularization.is_reg and regularization.loss_weight == 0.5
    plan = plan_dataset(dataset, 64)
    weights = sorted(item.subset.loss_weight * item.repeats for item in plan.items)
    # kohya balances: as many regularization draws per epoch as instance draws (2), each weighted 0.5.
    assert sum(w for w in weights if w < 1) == pytest.approx(2 * 0.5)


def test_empty_prompts_keep_the_datasets_own_captions():
    dataset = dreambooth_dataset(solid_dataset(1), "", class_dataset(1), "", True, 1.0)
    assert [image.caption for image in dataset.images] == ["tkred square", "dog"]


def test_zero_class_images_with_prior_preservation_is_a_clear_error():
    for missing in (None, class_dataset(0)):
        with pytest.raises(DatasetError, match="0 class images"):
            dreambooth_dataset(solid_dataset(1), "sks dog", missing, "dog", True, 1.0)


def test_without_prior_preservation_class_images_are_left_out_and_said_so():
    dataset = dreambooth_dataset(solid_dataset(2), "sks dog", class_dataset(3), "dog", False, 1.0)
    assert len(dataset) == 2 and "not trained" in dataset.notes[0]


def test_class_image_cache_is_keyed_by_every_setting_and_tops_up_the_missing_indices(tmp_path):
    cache = ClassImageCache(tmp_path, SETTINGS)
    assert cache.missing(2) == [0, 1]
    for index in cache.missing(2):
        cache.store(index, np.full((64, 64, 3), index * 40, np.uint8))
    again = ClassImageCache(tmp_path, SETTINGS)
    assert again.missing(2) == [] and again.missing(3) == [2] and again.seed(2) == 9
    assert '"model": "model-a"' in (again.folder / "settings.json").read_text()
    subset = again.dataset(2).subsets[0]
    assert subset.is_reg and [image.caption for image in subset.images] == ["a photo of a dog"] * 2
    for changed in (replace(SETTINGS, model="model-b"), replace(SETTINGS, cfg=5.0), replace(SETTINGS, seed=8)):
        assert ClassImageCache(tmp_path, changed).folder != cache.folder
