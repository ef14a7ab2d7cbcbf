"""TrainSession: prepare caches, run steps, save, resume, export. `run()` reads like a table of contents."""

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import AdapterNetwork, select_targets
from .adapters.kohya import lora_metadata, tag_frequency
from .checkpoints import TrainState, load_state, save_state
from .config import TrainConfig
from .data import Dataset
from .data.feed import Example, TrainingFeed
from .data.plan import DatasetPlan, epoch_batches, plan_dataset
from .errors import ConfigError, DatasetError, TrainingDivergedError
from .events import CheckpointSaved, Notice, StepDone
from .host import Host, ModelBridge
from .noise import add_noise, sample_timesteps, training_target

log = logging.getLogger(__name__)
EXPORT_DTYPE = torch.float16


@dataclass
class TrainResult:
    steps_done: int
    stopped_early: bool
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None


class TrainSession:
    def __init__(
        self,
        bridge: ModelBridge,
        dataset: Dataset,
        config: TrainConfig,
        run_dir: Path | None = None,
        cache_dir: Path | None = None,
        trainable: torch.nn.Module | None = None,
    ):
        """`trainable`: what to train instead of the LoRA network the config describes (e.g. a
        trainer.finetune.FullFineTune); it has the network's interface: attach/detach, parameters,
        kohya_state_dict/load_kohya_state_dict for resumable states."""
        config.validate()
        if not len(dataset):
            raise DatasetError("The dataset is empty: give the trainer at least one image.")
        self.bridge, self.dataset, self.config, self.run_dir = bridge, dataset, config, run_dir
        self.plan: DatasetPlan = plan_dataset(dataset, config.resolution)
        if not self.plan.items:
            reasons = "; ".join(f"{Path(s.source).name}: {s.reason}" for s in self.plan.unassigned[:5])
            raise DatasetError(f"No image of the dataset fits a bucket ({reasons}).")
        self.feed = TrainingFeed(bridge, self.plan, config.seed, cache_dir)
        self.network = trainable if trainable is not None else self._build_network()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.order, self.position = 0, [], 0  # order: this epoch's batches (plan item indices)
        self.losses: list[float] = []
        # Called as hook(session, host) inside the training context, before the first step and after every
        # step (trainer/monitor.py: validation loss, samples); they must not touch the training RNG.
        self.step_hooks: list = []
        self.started_at = time.time()
        self._prepared = False
        self._last_checkpoint: Path | None = None
        self._step_start: tuple | None = None  # RNG and batch position before the running step

    # ----- setup -----
    def _build_network(self) -> AdapterNetwork:
        targets = select_targets(self.bridge.denoiser_modules(), self.config.targets)
        if not targets:
            raise ConfigError([f"targets '{self.config.targets}' matches no layer of this {self.bridge.family.title} model."])
        levels = self.bridge.unet_levels()
        named = {self.bridge.family.kohya_unet_name(path, levels): module for path, module in targets.items()}
        # Seed only the CPU generator (the branches are built there) inside fork_rng, which restores it:
        # torch.manual_seed would also reseed every CUDA device's generator that other nodes sample with.
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.config.seed)
            return AdapterNetwork(named, self.config.rank, self.config.alpha).to(self.bridge.device)

    def prepare(self, host: Host) -> None:
        """Encode every fixed-crop image once (VAE, or the latent cache) and every caption that never
        changes once (frozen text encoders)."""
        for skipped in self.plan.unassigned:
            host.emit(Notice(f"Not trained: {skipped.source}: {skipped.reason}"))
        # Outside inference mode: cached tensors must be ordinary ones that autograd may save.
        with torch.inference_mode(False), torch.no_grad():
            self.feed.prepare()
        self._prepared = True
        cache = self.feed.cache
        host.emit(Notice(
            f"Encoded {self.feed.encoded} images ({cache.hits} latents from the cache) and {len(self.feed.prompts)} "
            f"captions; {len(self.plan.items)} images in {len(self.plan.bucket_counts())} buckets, "
            f"{self.steps_per_epoch} steps per epoch."
        ))

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.batches_per_epoch(self.config.batch_size)

    def resume(self, folder: Path) -> None:
        # Outside inference mode: loaded optimizer state is updated in place by every step.
        with torch.inference_mode(False):
            state = load_state(folder)
            self._check_resumable(folder, TrainConfig.from_dict(state.config))
            self.network.load_kohya_state_dict(state.network)
            self.optimizer.load_state_dict(state.optimizer)
            self.generator.set_state(state.generator)
        self.step, self.order, self.position = state.step, state.order, state.position
        if state.dataset and state.dataset != self.plan_fingerprint():
            log.warning("TuneKit: the dataset changed since %s was saved: a new epoch starts.", folder)
            self.order, self.position = [], 0
        self._last_checkpoint = folder

    def _check_resumable(self, folder: Path, saved: TrainConfig) -> None:
        if (saved.rank, saved.targets, saved.alpha) != (self.config.rank, self.config.targets, self.config.alpha):
            raise ConfigError([
                f"cannot resume {folder}: it was trained with rank {saved.rank}, alpha {saved.alpha}, targets "
                f"'{saved.targets}'. Use those settings, or a new run name to start fresh."
            ])

    # ----- training -----
    def run(self, host: Host) -> TrainResult:
        if not self._prepared:
            self.prepare(host)
        try:
            # Hosts may call us under inference mode (ComfyUI runs every node in it).
            with torch.inference_mode(False), torch.enable_grad(), self.bridge.training(self.network.attach, self.network.detach):
                self._call_step_hooks(host)
                while self.step < self.config.steps:
                    if host.should_stop():
                        return self._stop_early(host)
                    self._train_step(host)
                    self._call_step_hooks(host)
                    if self._save_due():
                        self._save(host, partial=True)
        except BaseException:
            # Cancelled from inside the model (ComfyUI raises in its ops), out of memory, NaN...:
            # keep every completed step.
            self._keep_progress(host)
            raise
        return TrainResult(self.step, False, self.losses, self._last_checkpoint)

    def _call_step_hooks(self, host: Host) -> None:
        for hook in self.step_hooks:
            hook(self, host)

    def _train_step(self, host: Host) -> None:
        began = time.perf_counter()
        self._step_start = (self.generator.get_state(), list(self.order), self.position)
        with torch.no_grad():
            batch = self._next_batch()
        loss = self._loss(batch, self.generator)
        if not math.isfinite(loss.item()):
            raise TrainingDivergedError(
                f"The loss became {loss.item()} at step {self.step + 1}: training diverged. The last good state "
                f"is kept. Lower learning_rate (now {self.config.learning_rate}), e.g. by 10x."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._step_start = None
        self.step += 1
        self.losses.append(loss.item())
        host.emit(StepDone(self.step, self.config.steps, loss.item(), self.config.learning_rate, time.perf_counter() - began))

    def _loss(self, batch: list[Example], generator: torch.Generator) -> torch.Tensor:
        device = self.bridge.device
        latents = torch.stack([example.latent for example in batch])
        noise = torch.randn(latents.shape, generator=generator)
        alphas = self.bridge.alphas_cumprod().cpu()
        timesteps = sample_timesteps(len(batch), len(alphas), generator)
        noisy = add_noise(latents, noise, alphas, timesteps)
        target = training_target(self.bridge.prediction_type, latents, noise, alphas, timesteps)
        prediction = self.bridge.predict(
            noisy.to(device), timesteps.to(device), [e.prompt for e in batch], [e.size for e in batch]
        )
        return weighted_mse(prediction.float(), target.to(device).float(), batch)

    def evaluate(self, seed: int = 1234, draws: int = 4) -> float:
        """Mean loss over every image at fixed noise and timesteps: comparable between steps and runs."""
        if not self._prepared:
            raise RuntimeError("call prepare() before evaluate()")
        generator = torch.Generator().manual_seed(seed)
        losses = []
        with torch.inference_mode(False), torch.no_grad():
            examples = self.feed.fixed_examples()
        with torch.inference_mode(False), torch.no_grad(), self.bridge.training(self.network.attach, self.network.detach):
            for _ in range(draws):
                for example in examples:
                    losses.append(self._loss([example], generator).item())
        return sum(losses) / len(losses)

    def _next_batch(self) -> list[Example]:
        """The next batch of one bucket. Batches are drawn once per epoch; the order and position are
        saved, and every random choice inside a step is seeded by the step, so resume is exact."""
        if self.position >= len(self.order):
            self.order = epoch_batches(self.plan, self.config.batch_size, self.generator)
            self.position = 0
        indices = self.order[self.position]
        self.position += 1
        epoch = self.step // self.steps_per_epoch + 1
        return self.feed.batch(indices, self.step, epoch, self.config.steps)

    def plan_fingerprint(self) -> str:
        """Identifies the planned items (content, bucket, repeats): a saved order is only valid for them."""
        parts = [(i.image.digest or i.image.source, i.assignment.bucket, i.repeats) for i in self.plan.items]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    # ----- saving -----
    def _save_due(self) -> bool:
        every = self.config.save_every
        return bool(every) and self.step % every == 0 and self.step < self.config.steps

    def _save(self, host: Host, partial: bool) -> Path | None:
        if self.run_dir is None:
            return None
        state = TrainState(
            step=self.step,
            network=self.network.kohya_state_dict(torch.float32),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            order=self.order,
            position=self.position,
            config=self.config.to_dict(),
            dataset=self.plan_fingerprint(),
        )
        self._last_checkpoint = save_state(self.run_dir, state)
        host.emit(CheckpointSaved(self._last_checkpoint, self.step, partial))
        return self._last_checkpoint

    def _stop_early(self, host: Host) -> TrainResult:
        folder = self._save(host, partial=True)
        host.emit(Notice(f"Training stopped at step {self.step}/{self.config.steps}; resumable state: {folder}"))
        return TrainResult(self.step, True, self.losses, folder)

    def _keep_progress(self, host: Host) -> None:
        """Roll back a half-done step (its random draws), then save the last completed one."""
        if self._step_start is not None:
            generator_state, self.order, self.position = self._step_start
            self.generator.set_state(generator_state)
            self._step_start = None
        try:
            folder = self._save(host, partial=True)
        except Exception:
            log.exception("TuneKit could not save the training state at step %d", self.step)
            return
        if folder:
            host.emit(Notice(f"Training stopped at step {self.step}/{self.config.steps}; resumable state: {folder}"))

    @property
    def last_checkpoint(self) -> Path | None:
        return self._last_checkpoint

    def save_final(self, host: Host) -> Path | None:
        return self._save(host, partial=False)

    # ----- export -----
    def export(self, output_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The LoRA as kohya tensors (fp16) and its `ss_*` metadata."""
        captions = [image.caption for image in self.dataset.images]
        metadata = lora_metadata(
            self.bridge.family,
            self.config,
            output_name=output_name,
            steps_done=self.step,
            num_images=len(captions),
            tag_frequency=tag_frequency(captions),
            started_at=self.started_at,
            prediction_type=self.bridge.prediction_type,
        )
        return self.network.kohya_state_dict(EXPORT_DTYPE), metadata


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, batch: list[Example]) -> torch.Tensor:
    """MSE; with masks or loss weights, kohya's form: mean over each image of (error * mask), times the
    image's weight (prior_loss_weight), mean over the batch."""
    if all(example.mask is None and example.weight == 1.0 for example in batch):
        return F.mse_loss(prediction, target)
    errors = (prediction - target) ** 2
    masks = [example.mask if example.mask is not None else torch.ones(1, *errors.shape[-2:]) for example in batch]
    errors = errors * torch.stack(masks).to(errors.device, errors.dtype)
    weights = torch.tensor([example.weight for example in batch], device=errors.device, dtype=errors.dtype)
    return (errors.mean(dim=(1, 2, 3)) * weights).mean()
