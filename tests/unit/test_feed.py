"""Training on buckets: batches never mix buckets, latents are cached on disk and invalidated correctly,
per-step augmentation is seeded, resume stays exact, SDXL sizes come from the real crop."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.config import TrainConfig
from tunekit.trainer.data import Augment, BucketSettings, CaptionOptions, Dataset, TrainImage, scan_image_folder
from tunekit.trainer.data.buckets import Assignment
from tunekit.trainer.data.transforms import crop_to_bucket, random_crop
from tunekit.trainer.host import NullHost
from tunekit.trainer.losses import per_sample_mse
from tunekit.trainer.session import TrainSession

from fakes import FakeBridge
from test_training import RecordingHost

SETTINGS = dict(steps=12, learning_rate=5e-3, rank=4, alpha=4, resolution=128, seed=3, batch_size=2)


def mixed_folder(folder, count=6):
    """Images of three aspect ratios: buckets 128x128, 256x64 and 64x256 at resolution 128."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        size = [(64, 64), (256, 64), (64, 256)][index % 3]
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"tk, tag{index}, red, blue, green")
    return folder


def scan(folder, **subset):
    """A folder with buckets down to 64 pixels (the defaults start at the resolution, 128 here)."""
    return scan_image_folder(folder, buckets=BucketSettings(min_reso=64), **subset)


def session(dataset, run_dir=None, bridge=None, cache_dir=None, **overrides):
    return TrainSession(bridge or FakeBridge(), dataset, TrainConfig(**{**SETTINGS, **overrides}), run_dir, cache_dir)


def test_batches_never_mix_buckets_and_an_epoch_covers_every_repeat(tmp_path):
    dataset = scan(mixed_folder(tmp_path / "d"), repeats=2)
    s = session(dataset)
    s.prepare(NullHost())
    assert sorted(s.plan.bucket_counts().items()) == [((64, 256), 4), ((128, 128), 4), ((256, 64), 4)]
    assert s.batches_per_epoch == s.steps_per_epoch == 6
    seen = []
    for number in range(s.batches_per_epoch):
        batch, _ = s._next_batch(number)
        assert len({tuple(example.latent.shape) for example in batch}) == 1
        seen.extend(s.order[s.position - 1])
    assert sorted(seen) == sorted(list(range(6)) * 2)


def test_second_run_encodes_nothing_and_changes_invalidate_only_what_changed(tmp_path):
    folder, cache = mixed_folder(tmp_path / "d"), tmp_path / "cache"
    flipped = scan(folder).with_subsets(augment=Augment(flip=True))
    bridge = FakeBridge()
    session(flipped, bridge=bridge, cache_dir=cache).prepare(NullHost())
    assert bridge.encoded_images == 12  # 6 images, each also flipped

    again = FakeBridge()
    session(scan(folder).with_subsets(augment=Augment(flip=True)), bridge=again, cache_dir=cache).run(NullHost())
    assert again.encoded_images == 0

    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "img0.png")  # new content
    edited = FakeBridge()
    session(scan(folder).with_subsets(augment=Augment(flip=True)), bridge=edited, cache_dir=cache).prepare(NullHost())
    assert edited.encoded_images == 2

    other_vae = FakeBridge()
    other_vae.vae_name = "another-vae"
    session(scan(folder), bridge=other_vae, cache_dir=cache).prepare(NullHost())
    assert other_vae.encoded_images == 6

    other_bucket = FakeBridge()
    session(scan(folder), bridge=other_bucket, cache_dir=cache, resolution=192).prepare(NullHost())
    assert other_bucket.encoded_images == 6

    cropped = FakeBridge()
    crop_set = scan(folder).with_subsets(augment=Augment(random_crop=True))
    s = session(crop_set, bridge=cropped, cache_dir=cache, steps=3)
    s.prepare(NullHost())
    assert cropped.encoded_images == 0  # random crop: nothing cached up front...
    s.run(NullHost())
    assert cropped.encoded_images == 3 * SETTINGS["batch_size"]  # ...but each step's crops


def test_encoding_goes_in_batches_of_one_bucket(tmp_path):
    bridge = FakeBridge()
    calls = []
    original = bridge.encode_images
    bridge.encode_images = lambda pixels: calls.append(tuple(pixels.shape)) or original(pixels)
    s = session(scan(mixed_folder(tmp_path / "d", count=12)), bridge=bridge)
    s.prepare(NullHost())
    assert sorted(calls) == [(4, 64, 256, 3), (4, 128, 128, 3), (4, 256, 64, 3)]


def augmented(folder):
    captions = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout_rate=0.2, dropout_rate=0.1)
    return scan(folder).with_subsets(captions=captions, augment=Augment(flip=True, random_crop=True))


def test_resume_is_exact_with_buckets_flips_random_crops_and_caption_shuffle(tmp_path):
    folder = mixed_folder(tmp_path / "d")
    straight = session(augmented(folder))
    straight.run(NullHost())

    first = session(augmented(folder), tmp_path / "run")
    assert first.run(RecordingHost(stop_after=5)).stopped_early
    resumed = session(augmented(folder), tmp_path / "run")
    resumed.resume(latest_state_folder(tmp_path / "run"))
    resumed.run(NullHost())
    expected, actual = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_captions_vary_per_step_but_repeat_for_the_same_step(tmp_path):
    bridge = FakeBridge()
    seen = []
    original = bridge.encode_prompts
    bridge.encode_prompts = lambda captions: seen.extend(captions) or original(captions)
    s = session(augmented(mixed_folder(tmp_path / "d")), bridge=bridge)
    s.prepare(NullHost())
    assert seen == []  # the text-embedding cache is off for varying captions
    first = [s.feed.batch([0, 1], step, 1, 100) for step in range(6)]
    again = [s.feed.batch([0, 1], step, 1, 100) for step in range(6)]
    assert [[e.size for e in b] for b in first] == [[e.size for e in b] for b in again]
    assert len(set(seen)) > 2


def test_a_dataset_change_on_resume_starts_a_new_epoch(tmp_path):
    folder = mixed_folder(tmp_path / "d")
    session(scan(folder), tmp_path / "run", steps=2, save_every=1).run(NullHost())
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "img1.png")
    resumed = session(scan(folder), tmp_path / "run", steps=4)
    resumed.resume(latest_state_folder(tmp_path / "run"))
    assert resumed.order == [] and resumed.step == 1
    assert resumed.run(NullHost()).steps_done == 4


def test_sdxl_sizes_come_from_the_real_crop():
    image = Image.new("RGB", (300, 200))
    assignment = Assignment((128, 64), (192, 128), 0.0)  # resized 192x128, bucket 128x64
    crop = random_crop(assignment, random.Random(5), flip=False)
    pixels, size = crop_to_bucket(image, assignment, crop)
    assert pixels.shape == (64, 128, 3)
    assert size.original == (200, 300) and size.target == (64, 128) and size.crop_top_left == (crop.top, crop.left)
    flipped = random_crop(assignment, random.Random(5), flip=True)
    _, mirrored = crop_to_bucket(image, assignment, flipped)
    assert mirrored.crop_top_left == (flipped.top, 192 - flipped.left - 128)


def test_images_too_small_for_no_upscale_buckets_are_reported_not_trained(tmp_path):
    folder = mixed_folder(tmp_path / "d", count=3)
    Image.new("RGB", (40, 30)).save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("tiny")
    dataset = scan_image_folder(folder).with_subsets(buckets=BucketSettings(no_upscale=True))
    host = RecordingHost()
    s = session(dataset, steps=1)
    s.run(host)
    assert [skipped.source.endswith("tiny.png") for skipped in s.plan.unassigned] == [True]
    assert any("tiny.png" in getattr(event, "message", "") and "smaller than the bucket step" in event.message
               for event in host.events)


def test_masks_and_prior_loss_weight_weight_the_loss():
    pixels = np.full((64, 64, 3), 200, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[:, :32] = 1
    masked = Dataset.from_images([TrainImage("graph image 0", "a", pixels, mask=mask, size=(64, 64), digest="m")])
    s = session(masked, steps=1, batch_size=1, resolution=64)
    s.prepare(NullHost())
    (example,) = s.feed.batch([0], 0, 1, 1)
    assert example.mask.shape == (1, 8, 8) and example.mask[0, :, :4].min() == 1 and example.mask[0, :, 4:].max() == 0
    prediction, target = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    target[..., 4:] = 100  # errors under the mask's zeros do not count
    assert per_sample_mse(prediction, target, example.mask[None]).item() == pytest.approx(0.5)
    example.weight = 0.25
    assert s._loss_weights([example], torch.tensor([500])).tolist() == [0.25]
