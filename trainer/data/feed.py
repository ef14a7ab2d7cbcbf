"""The training feed: turns a planned dataset into batches of latents, text embeddings, sizes and loss
weights, encoding through the host's models as little as possible.

- Latents of subsets with a fixed crop are encoded once, in batches of one bucket, and cached (a flip is a
  second entry); random-crop subsets encode the step's crops each step.
- Captions that never change are encoded once; subsets with shuffle / dropout / tag dropout / warmup encode
  the step's captions each step (the text-embedding cache is off for them).
- While the text side trains (text-encoder LoRA, textual inversion) every caption is encoded every step,
  with grad: the text-embedding cache is off.
- Every random choice of a step (flip, crop, caption) comes from a `random.Random` seeded with the run's
  seed and the step number: a resumed run makes exactly the same choices.
"""

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..host import ModelBridge, PromptEmbedding, SizeInfo
from .captions import CaptionOptions, process_caption
from .dataset import TrainImage
from .images import content_digest
from .latent_cache import LatentCache, latent_key
from .plan import DatasetPlan, PlannedImage
from .transforms import Crop, centre_crop, crop_mask, crop_to_bucket, random_crop

log = logging.getLogger(__name__)
ENCODE_BATCH = 8


@dataclass
class Example:
    latent: torch.Tensor  # [C, h, w] on the CPU
    prompt: PromptEmbedding
    size: SizeInfo
    weight: float = 1.0  # kohya prior_loss_weight for regularization images
    mask: torch.Tensor | None = None  # [1, h, w] loss weights at latent resolution


@dataclass
class _Pending:
    """One image crop to encode."""

    item: PlannedImage
    crop: Crop
    key: str | None  # cache key; None: not cached (random crop)


class TrainingFeed:
    def __init__(self, bridge: ModelBridge, plan: DatasetPlan, seed: int, cache_dir: Path | None = None,
                 text_trains: bool = False, caption_dropout_rate: float = 0.0):
        self.bridge, self.plan, self.seed, self.text_trains = bridge, plan, seed, text_trains
        self.caption_dropout_rate = caption_dropout_rate  # run-wide; a subset's own rate wins where set
        self.cache = LatentCache(cache_dir)
        self.vae_identity = bridge.vae_identity()
        self.prompts: dict[str, PromptEmbedding] = {}
        self.encoded = 0  # images run through the VAE by this feed
        self._digests: dict[int, str] = {}
        self._masks: dict[tuple, torch.Tensor | None] = {}

    # ----- once, before training -----
    def prepare(self) -> None:
        """Encode (or find cached) every fixed-crop latent and every caption that never changes."""
        pending = []
        for item in self.plan.items:
            if not item.subset.augment.cacheable:
                continue
            for flip in ((False, True) if item.subset.augment.flip else (False,)):
                crop = centre_crop(item.assignment, flip)
                key = self._key(item, crop)
                if self.cache.get(key) is None:
                    pending.append(_Pending(item, crop, key))
        self._encode(pending)
        if self.text_trains:
            return
        fixed = sorted({self._fixed_caption(item) for item in self.plan.items if not self._caption_options(item).varies})
        self._encode_prompts(fixed)

    def _key(self, item: PlannedImage, crop: Crop) -> str:
        digest = self._digests.get(id(item.image))
        if digest is None:
            digest = self._digests[id(item.image)] = item.image.digest or _digest(item.image)
        return latent_key(digest, item.assignment.bucket, item.assignment.resized, crop,
                          item.subset.augment.interpolation, self.vae_identity)

    def _encode(self, pending: list[_Pending]) -> list[torch.Tensor]:
        """Encode in batches of one bucket; cached entries are stored. Returns latents in input order."""
        latents: list[torch.Tensor | None] = [None] * len(pending)
        by_bucket: dict = {}
        for index, job in enumerate(pending):
            by_bucket.setdefault(job.item.assignment.bucket, []).append(index)
        for indices in by_bucket.values():
            for start in range(0, len(indices), ENCODE_BATCH):
                chunk = indices[start:start + ENCODE_BATCH]
                pixels = torch.stack([self._pixels(pending[i])[0] for i in chunk])
                encoded = self.bridge.encode_images(pixels).float().cpu()
                self.encoded += len(chunk)
                for i, latent in zip(chunk, encoded):
                    latents[i] = latent
                    if pending[i].key:
                        self.cache.put(pending[i].key, latent)
        return latents

    def _pixels(self, job: _Pending) -> tuple[torch.Tensor, SizeInfo]:
        image = job.item.image.load(composite=not job.item.subset.augment.alpha_mask)
        pixels, size = crop_to_bucket(image, job.item.assignment, job.crop, job.item.subset.augment.interpolation)
        return torch.from_numpy(pixels), size

    def _encode_prompts(self, captions: list[str]) -> None:
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self.prompts]
        if missing:
            self.prompts.update(zip(missing, self.bridge.encode_prompts(missing)))

    @staticmethod
    def _fixed_caption(item: PlannedImage) -> str:
        return process_caption(item.image.caption, item.subset.captions, random.Random(0))

    # ----- every step -----
    def batch(self, indices: list[int], step: int, epoch: int, max_steps: int) -> list[Example]:
        """The examples of one step. `step` is 0-based, `epoch` 1-based."""
        rng = random.Random(f"tunekit:{self.seed}:{step}")
        items = [self.plan.items[index] for index in indices]
        crops = [self._draw_crop(item, rng) for item in items]
        captions = [self._caption(item, rng, epoch, step, max_steps) for item in items]
        with torch.enable_grad():  # the step's batch is drawn under no_grad; trained text needs its graph
            prompts = self._prompts(captions)
        latents = self._latents(items, crops)
        return [self._example(item, crop, latent, prompt)
                for item, crop, latent, prompt in zip(items, crops, latents, prompts)]

    def _prompts(self, captions: list[str]) -> list[PromptEmbedding]:
        """The captions' embeddings: encoded now while the text side trains, else from the cache."""
        if self.text_trains:
            return self.bridge.encode_prompts(captions)
        self._encode_prompts(captions)
        return [self.prompts[caption] for caption in captions]

    def _draw_crop(self, item: PlannedImage, rng: random.Random) -> Crop:
        flip = item.subset.augment.flip and rng.random() < 0.5
        if item.subset.augment.random_crop:
            return random_crop(item.assignment, rng, flip)
        return centre_crop(item.assignment, flip)

    def _caption(self, item: PlannedImage, rng: random.Random, epoch: int, step: int, max_steps: int) -> str:
        options = self._caption_options(item)
        if not options.varies:
            return self._fixed_caption(item)
        return process_caption(item.image.caption, options, rng, epoch, step, max_steps)

    def _caption_options(self, item: PlannedImage) -> CaptionOptions:
        """The subset's caption options, with the run-wide caption dropout where the subset sets none."""
        options = item.subset.captions
        if self.caption_dropout_rate and not options.dropout_rate:
            return replace(options, dropout_rate=self.caption_dropout_rate)
        return options

    def _latents(self, items: list[PlannedImage], crops: list[Crop]) -> list[torch.Tensor]:
        latents, pending, slots = [], [], []
        for slot, (item, crop) in enumerate(zip(items, crops)):
            cached = self.cache.get(self._key(item, crop)) if item.subset.augment.cacheable else None
            latents.append(cached)
            if cached is None:
                key = self._key(item, crop) if item.subset.augment.cacheable else None
                pending.append(_Pending(item, crop, key))
                slots.append(slot)
        for slot, latent in zip(slots, self._encode(pending)):
            latents[slot] = latent
        return latents

    def _example(self, item: PlannedImage, crop: Crop, latent: torch.Tensor, prompt: PromptEmbedding) -> Example:
        memo = (id(item.image), crop)
        if memo not in self._masks:
            self._masks[memo] = self._mask(item, crop, latent.shape[-2:])
        return Example(latent, prompt, size_info(item, crop), item.subset.loss_weight, self._masks[memo])

    @staticmethod
    def _mask(item: PlannedImage, crop: Crop, latent_size) -> torch.Tensor | None:
        mask = item.image.mask
        if mask is None and item.subset.augment.alpha_mask:
            mask = alpha_of(item.image)
        if mask is None:
            return None
        pixels = torch.from_numpy(crop_mask(mask, item.assignment, crop).copy())[None, None]
        return F.interpolate(pixels, size=tuple(latent_size), mode="area")[0]

    # ----- fixed examples for evaluation -----
    def fixed_examples(self) -> list[Example]:
        """Every image at its centre crop, unflipped, with its caption unchanged."""
        items = self.plan.items
        crops = [centre_crop(item.assignment) for item in items]
        prompts = self._prompts([self._fixed_caption(item) for item in items])
        latents = self._latents(items, crops)
        return [self._example(i, c, lat, prompt) for i, c, lat, prompt in zip(items, crops, latents, prompts)]


def size_info(item: PlannedImage, crop: Crop) -> SizeInfo:
    """The SizeInfo `crop_to_bucket` gives for this crop, without touching pixels."""
    (bucket_w, bucket_h), resized = item.assignment.bucket, item.assignment.resized
    left = resized[0] - crop.left - bucket_w if crop.flip else crop.left
    width, height = item.size
    return SizeInfo(original=(height, width), crop_top_left=(crop.top, left), target=(bucket_h, bucket_w))


def alpha_of(image: TrainImage) -> np.ndarray | None:
    """The alpha channel of an image file as a mask (kohya `alpha_mask`), EXIF-oriented; None if opaque."""
    from PIL import ImageOps

    with Image.open(image.source) as picture:
        picture = ImageOps.exif_transpose(picture)
        if "A" not in picture.getbands() and "transparency" not in picture.info:
            return None
        return np.asarray(picture.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0


def _digest(image: TrainImage) -> str:
    if image.pixels is not None:
        return content_digest(np.ascontiguousarray(image.pixels).tobytes() + repr(image.pixels.shape).encode())
    return content_digest(Path(image.source).read_bytes())


