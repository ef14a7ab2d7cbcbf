"""Knowing when to stop: validation loss on held-out images and the host's samples, every N steps.

The validation loss uses the same noise and timesteps at every evaluation (drawn once from their own seed),
so a change in the curve is a change of the model, not of the draw. Held-out images are split off the
dataset by seed before planning: they are never trained on. The monitor runs as a step hook of the session
(inside its training context, adapters attached), under `torch.random.fork_rng`, and never touches the
session's generator: a run trains the same weights with and without it.
"""

import csv
import io
import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .data import Dataset
from .data.dataset import Augment
from .data.feed import Example, TrainingFeed
from .data.plan import plan_dataset
from .errors import ConfigError
from .events import SamplesSaved, ValidationLoss
from .files import atomic_write
from .host import Host, ModelBridge
from .noise import add_noise, training_target

log = logging.getLogger(__name__)
LOG_NAME = "validation.csv"
LOG_COLUMNS = ("step", "validation_loss", "train_loss", "seconds")
Sampler = Callable[[int], Sequence[Path]]  # step -> the sample images it wrote


@dataclass(frozen=True)
class MonitorSettings:
    every: int = 50  # validate and sample at step 0, every N steps and at the last step
    validation_count: int = 0  # images of the dataset held out for the validation loss (not trained on)
    validation_seed: int = 0  # picks the held-out images and their fixed noise
    draws: int = 4  # (noise, timestep) pairs per held-out image; timesteps evenly spread over the schedule
    patience: int = 0  # stop once the validation loss has not reached a new low for this many rounds (0: never)
    keep_best: bool = False  # the result holds the weights of the round with the lowest validation loss

    def problems(self) -> list[str]:
        found = []
        if self.every < 1:
            found.append(f"every is {self.every}: validate and sample every N steps with N of at least 1 (e.g. 50).")
        if self.validation_count < 0:
            found.append(f"validation_count is {self.validation_count}: use 0 (no held-out images) or more.")
        if self.draws < 1:
            found.append(f"draws is {self.draws}: use at least 1 noise draw per validation image (4 is typical).")
        if self.patience < 0:
            found.append(f"patience is {self.patience}: use 0 (train every step) or the rounds without a new low "
                         f"validation loss after which to stop (e.g. 3).")
        return found

    @property
    def needs_validation(self) -> bool:
        return bool(self.patience or self.keep_best)


def split_validation(dataset: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training images, held-out images): `count` images of the non-regularization subsets, chosen by
    `seed`, leave the training set. The same dataset and seed always hold out the same images."""
    if count <= 0:
        return dataset, None
    candidates = [(s, i) for s, subset in enumerate(dataset.subsets) if not subset.is_reg for i in range(len(subset))]
    if count >= len(candidates):
        raise ConfigError([
            (f"validation_count is {count} but the dataset has {len(candidates)} training images (regularization "
             f"images excluded): hold out fewer (one in ten is typical), or give a separate validation dataset.")
        ])
    held = set(random.Random(f"tunekit:validation:{seed}").sample(candidates, count))
    train, validation = [], []
    for s, subset in enumerate(dataset.subsets):
        kept = [image for i, image in enumerate(subset.images) if (s, i) not in held]
        out = [image for i, image in enumerate(subset.images) if (s, i) in held]
        if kept:
            train.append(replace(subset, images=kept))
        if out:
            validation.append(held_out_subset(replace(subset, images=out)))
    notes = [*dataset.notes, f"{count} images held out for the validation loss (validation seed {seed})."]
    return Dataset(train, dataset.skipped, notes), Dataset(validation)


def held_out_subset(subset):
    """Validation images as they are: centre crop, no flip, once each."""
    augment = Augment(interpolation=subset.augment.interpolation, alpha_mask=subset.augment.alpha_mask)
    return replace(subset, repeats=1, augment=augment, is_reg=False, loss_weight=1.0)


def validation_dataset(dataset: Dataset) -> Dataset:
    """A separate validation dataset, used as it is (no repeats, no augmentation)."""
    return Dataset([held_out_subset(subset) for subset in dataset.subsets], dataset.skipped, dataset.notes)


class ValidationSet:
    """Held-out images with fixed noise and timesteps; `loss()` is their mean MSE against the target."""

    def __init__(self, bridge: ModelBridge, dataset: Dataset, resolution: int, seed: int, draws: int,
                 cache_dir: Path | None = None, text_trains: bool = False):
        """`text_trains`: the session trains a text encoder (or embeddings): captions are encoded again at
        every evaluation, by the encoder as trained so far."""
        self.bridge, self.seed, self.draws = bridge, seed, draws
        self.plan = plan_dataset(dataset, resolution)
        self.feed = TrainingFeed(bridge, self.plan, seed, cache_dir, text_trains=text_trains)
        self.examples: list[Example] = []
        self.noise: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.plan.items)

    def prepare(self) -> None:
        """Encode the images and captions once and draw their noise."""
        with torch.inference_mode(False), torch.no_grad():
            self.examples = self.feed.fixed_examples()
        generator = torch.Generator().manual_seed(self.seed)
        self.noise = [torch.randn((self.draws, *e.latent.shape), generator=generator) for e in self.examples]

    def timesteps(self) -> torch.Tensor:
        """Evenly spread over the schedule: every noise level weighs the same at every evaluation."""
        count = len(self.bridge.alphas_cumprod())
        return ((torch.arange(self.draws) + 0.5) * count / self.draws).long()

    def loss(self) -> float:
        """Call inside the bridge's training context (adapters attached)."""
        if not self.examples:
            self.prepare()
        elif self.feed.text_trains:
            self.examples = self.feed.fixed_examples()
        alphas = self.bridge.alphas_cumprod().cpu()
        timesteps, device, total = self.timesteps(), self.bridge.device, 0.0
        with torch.no_grad():
            for example, noise in zip(self.examples, self.noise):
                latents = example.latent.expand(self.draws, *example.latent.shape)
                noisy = add_noise(latents, noise, alphas, timesteps)
                target = training_target(self.bridge.prediction_type, latents, noise, alphas, timesteps)
                prediction = self.bridge.predict(noisy.to(device), timesteps.to(device),
                                                 [example.prompt] * self.draws, [example.size] * self.draws)
                errors = (prediction.float() - target.to(device).float()) ** 2
                if example.mask is not None:
                    errors = errors * example.mask.to(errors.device)
                total += errors.mean().item()
        return total / len(self.examples)


@dataclass(frozen=True)
class BestRound:
    step: int
    loss: float
    weights: dict[str, torch.Tensor] | None  # the weights a save would write then (CPU copies), with keep_best


class Monitor:
    """The session's step hook: at step 0, every `settings.every` steps and at the last step, the validation
    loss (emitted and logged to `validation.csv` in the run folder) and the host's samples. With `patience` it
    ends the run once the loss has not reached a new low for that many rounds; with `keep_best` the run's
    result (saved and exported) holds the weights of its lowest round. Both start afresh in a resumed run."""

    def __init__(self, settings: MonitorSettings, validation: ValidationSet | None = None,
                 sampler: Sampler | None = None, log_dir: Path | None = None):
        problems = settings.problems()
        if settings.needs_validation and validation is None:
            problems.append("patience and keep_best follow the validation loss: hold out images with validation_count, "
                            "or connect a validation dataset.")
        if problems:
            raise ConfigError(problems)
        self.settings, self.validation, self.sampler = settings, validation, sampler
        self.log_path = log_dir / LOG_NAME if log_dir else None
        self.rows: list[dict] = read_log(self.log_path) if self.log_path else []
        self.samples: dict[int, list[Path]] = {}
        self.seconds = {"validation": 0.0, "samples": 0.0}
        self._losses_seen = 0
        self._done: set[int] | None = None  # steps monitored; None until the first call
        self.best: BestRound | None = None
        self.rounds_since_best = 0
        self.stopped_at: int | None = None  # where patience ended the run

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.settings.every == 0 or step == total_steps

    def __call__(self, session, host: Host) -> None:
        step = session.step
        if self._done is None:  # a resumed run redoes its curve from the resumed step on
            self.rows = [row for row in self.rows if row["step"] < step]
            self._done = set()
        if not self.due(step, session.config.steps) or step in self._done:
            return
        self._done.add(step)
        devices = [session.bridge.device] if session.bridge.device.type == "cuda" else []
        # The weights a save would write (EMA averages where on), restored exactly afterwards.
        saved_weights = getattr(session, "_weights_to_save", nullcontext)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), saved_weights():
            if self.validation is not None:
                self._validate(session, host)
            if self.sampler is not None:
                self._sample(step, host)
        if self.settings.keep_best and self.best and self._last_round(session):
            session.use_weights_of(self.best.step, self.best.weights)

    def _validate(self, session, host: Host) -> None:
        began = time.perf_counter()
        loss = self.validation.loss()
        seconds = time.perf_counter() - began
        self.seconds["validation"] += seconds
        recent = session.losses[self._losses_seen:]
        self._losses_seen = len(session.losses)
        train_loss = sum(recent) / len(recent) if recent else None
        self.rows.append({"step": session.step, "validation_loss": loss, "train_loss": train_loss, "seconds": seconds})
        if self.log_path:
            write_log(self.log_path, self.rows)
        host.emit(ValidationLoss(session.step, loss, len(self.validation), train_loss))
        self._follow_best(session, loss)

    def _follow_best(self, session, loss: float) -> None:
        """Keep the lowest round (its weights with keep_best); past `patience` rounds without a new low, end the run."""
        if self.best is None or loss < self.best.loss:
            weights = None
            if self.settings.keep_best:
                weights = {name: value.detach().to("cpu", copy=True) for name, value in session.network.state_dict().items()}
            self.best, self.rounds_since_best = BestRound(session.step, loss, weights), 0
            return
        self.rounds_since_best += 1
        if self.settings.patience and self.rounds_since_best >= self.settings.patience:
            self.stopped_at = session.step
            session.finish_early(f"the validation loss has not gone below {self.best.loss:.4f} (step {self.best.step}) "
                                 f"for {self.rounds_since_best} rounds")

    def _last_round(self, session) -> bool:
        return session.step == session.config.steps or self.stopped_at == session.step

    def _sample(self, step: int, host: Host) -> None:
        began = time.perf_counter()
        paths = list(self.sampler(step))
        self.seconds["samples"] += time.perf_counter() - began
        self.samples[step] = paths
        host.emit(SamplesSaved(step, tuple(paths)))

    def summary(self) -> str:
        """One line for the run's report."""
        parts = []
        if self.rows:
            first, last = self.rows[0], self.rows[-1]
            best = min(self.rows, key=lambda row: row["validation_loss"])
            parts.append(
                f"validation loss ({len(self.validation or [])} held-out images, fixed noise): step {first['step']} "
                f"{first['validation_loss']:.4f} -> step {last['step']} {last['validation_loss']:.4f}, lowest "
                f"{best['validation_loss']:.4f} at step {best['step']} ({self.seconds['validation']:.1f} s)"
            )
        if self.stopped_at is not None:
            parts.append(f"stopped at step {self.stopped_at}: no new low for {self.settings.patience} rounds")
        if self.settings.keep_best and self.best:
            parts.append(f"the result holds the weights of step {self.best.step} (lowest validation loss)")
        if self.samples:
            count = sum(map(len, self.samples.values()))
            parts.append(f"{count} samples at steps {', '.join(map(str, self.samples))} "
                         f"({self.seconds['samples']:.1f} s)")
        return "; ".join(parts)


def read_log(path: Path) -> list[dict]:
    """Rows of an earlier part of this run (a resumed run continues its curve)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [_parse_row(row) for row in csv.DictReader(handle)]


def _parse_row(row: dict) -> dict:
    return {"step": int(row["step"]), "validation_loss": float(row["validation_loss"]),
            "train_loss": float(row["train_loss"]) if row.get("train_loss") else None,
            "seconds": float(row.get("seconds") or 0)}


def write_log(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "train_loss": "" if row["train_loss"] is None else row["train_loss"]} for row in rows)
    atomic_write(path, lambda temp: temp.write_text(text.getvalue(), encoding="utf-8"))
