"""TrainSession: prepare caches, run steps, save, resume, export. `run()` reads like a table of contents."""

import copy
import hashlib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import AdapterNetwork, select_targets
from .adapters.kohya import init_tensors, lora_metadata, tag_frequency
from .checkpoints import TrainState, check_room_for_states, load_state, save_state, write_config
from .config import TrainConfig
from .data import Dataset
from .data.feed import Example, TrainingFeed
from .data.plan import DatasetPlan, epoch_batches, plan_dataset
from .ema import EMA
from .embeddings import PivotalTuning
from .errors import ConfigError, DatasetError, SaveError, TrainingDivergedError
from .events import CheckpointSaved, Notice, StepDone
from .host import Host, ModelBridge
from .losses import min_snr_weights, per_sample_mse, snr
from .memory import optimizer_state_bytes, state_tensors
from .noise import add_noise, draw_noise, is_zero_terminal, rescale_zero_terminal_snr, training_target
from .optim import build_optimizer, is_schedule_free, optimizer_name
from .parallel import DataParallel
from .precision import Precision
from .schedules import build_scheduler
from .text_encoders import network_param_groups, text_encoder_targets
from .timesteps import sample_timesteps, timestep_weights

log = logging.getLogger(__name__)
EXPORT_DTYPE = torch.float16
GOOD_STATE_COPY_LIMIT = 512 * 2**20  # bytes a copy of the last good state may take (LoRAs: a few MB)
TENSOR_HEADER_BYTES = 256  # what safetensors and torch.save write around each saved tensor: measured 240-280


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
        parallel: DataParallel | None = None,
    ):
        """`trainable`: what to train instead of the LoRA network the config describes (e.g. a
        trainer.finetune.FullFineTune); it has the network's interface: attach/detach, parameters,
        kohya_state_dict/load_kohya_state_dict for resumable states, and optionally param_groups(config).
        With `config.pivotal` a given embedding (trainer.embeddings.TokenEmbedding) trains together with
        that LoRA network (pivotal tuning). `parallel`: this process's place in a data-parallel run
        (trainer/parallel.py); only the main process has a run folder, so only it writes."""
        # The settings and how they fit the loaded model, all at once.
        if found := [*config.problems(), *config.model_problems(bridge.prediction_type, bridge.family.name)]:
            raise ConfigError(found)
        if not len(dataset):
            raise DatasetError("The dataset is empty: give the trainer at least one image.")
        self.parallel = parallel or DataParallel()
        self.bridge, self.dataset, self.config = bridge, dataset, config
        self.run_dir = run_dir if self.parallel.is_main else None
        self.plan: DatasetPlan = plan_dataset(dataset, config.resolution)
        if not self.plan.items:
            reasons = "; ".join(f"{Path(s.source).name}: {s.reason}" for s in self.plan.unassigned[:5])
            raise DatasetError(f"No image of the dataset fits a bucket ({reasons}).")
        if hasattr(bridge, "set_clip_skip"):
            bridge.set_clip_skip(config.clip_skip)
        text_trains = config.text_encoders != "none" or getattr(trainable, "trains_text", False)
        self.feed = TrainingFeed(bridge, self.plan, config.seed, cache_dir, caption_dropout_rate=config.caption_dropout_rate,
                                 text_trains=text_trains)
        self.network = self._trainable(trainable)
        self._build_training_state()
        self.losses: list[float] = []
        # Called as hook(session, host) inside the training context, before the first step and after every
        # step (trainer/monitor.py: validation loss, samples); they must not touch the training RNG.
        self.step_hooks: list = []
        self.started_at = time.time()
        self._prepared = False
        self._last_checkpoint: Path | None = None
        self._step_start: tuple | None = None  # RNG and batch position before the running step
        self._unread: list[torch.Tensor] = []  # step losses not yet read back to Python
        self._good: TrainState | None = None  # the last state whose losses were all finite (loss_every > 1)
        self._finish_reason = ""  # why a step hook ended the run before its last step
        self._chosen: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, weights) the result holds instead
        # Appended to every saved config.toml: the host's [run] table (trainer/runfile.py), so it re-runs headless.
        self.run_toml = ""

    # ----- setup -----
    def _trainable(self, given: torch.nn.Module | None) -> torch.nn.Module:
        if given is None:
            return self._build_network()
        return PivotalTuning(given, self._build_network()) if self.config.pivotal else given

    def _build_network(self) -> AdapterNetwork:
        config, settings = self.config, self.config.network_settings()
        targets = select_targets(self.bridge.denoiser_modules(), config.targets, config.target_pattern,
                                 settings.spec.conv_layers)
        if not targets:
            chosen = f"target_pattern '{config.target_pattern}'" if config.target_pattern else f"targets '{config.targets}'"
            raise ConfigError([f"{chosen} matches no layer of this {self.bridge.family.title} model."])
        levels = self.bridge.unet_levels()
        named = {self.bridge.family.kohya_unet_name(path, levels): module for path, module in targets.items()}
        if self.config.text_encoders != "none":
            named.update(text_encoder_targets(self.bridge.text_encoder_modules(), self.config))
        # Seed only the CPU generator (the branches are built there) inside fork_rng, which restores it:
        # torch.manual_seed would also reseed every CUDA device's generator that other nodes sample with.
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.config.seed)
            network = AdapterNetwork(named, settings=settings).to(self.bridge.device)
        if config.init_lora:
            network.load_kohya_state_dict(*init_tensors(Path(config.init_lora)))
        return network

    def _build_training_state(self) -> None:
        """Optimizer, LR schedule, loss scaling, EMA, noise schedule and RNG: everything a checkpoint saves."""
        config = self.config
        with torch.inference_mode(False):
            self.optimizer = build_optimizer(self._param_groups(), config, self.bridge.device)
            self.scheduler = build_scheduler(self.optimizer, config)
            self.precision = Precision(config.mixed_precision, self.bridge.device)
            self.ema = EMA(self._trained_parameters(), config.ema_decay) if config.ema_decay else None
        self.alphas = self._training_alphas()
        self.timestep_weights = timestep_weights(config, len(self.alphas))
        self.generator = torch.Generator().manual_seed(config.seed)  # each epoch's batch order
        self.step, self.order, self.position = 0, [], 0  # order: this epoch's batches (plan item indices)

    def _param_groups(self) -> list[dict]:
        """The trainable's groups (e.g. UNet and text encoders, each with its learning rate)."""
        if hasattr(self.network, "param_groups"):
            return self.network.param_groups(self.config)
        return network_param_groups(self.network, self.config)

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _training_alphas(self) -> torch.Tensor:
        """The model's own noise schedule (ComfyUI's model_sampling, with any ModelSamplingDiscrete
        override); rescaled to zero terminal SNR where asked and the model is not already."""
        alphas = self.bridge.alphas_cumprod().detach().cpu().float()
        if self.config.zero_terminal_snr and not is_zero_terminal(alphas):
            alphas = rescale_zero_terminal_snr(alphas)
        return alphas

    @property
    def prediction_type(self) -> str:
        return self.bridge.prediction_type

    def prepare(self, host: Host) -> None:
        """Check that the run's states fit on its disk, then encode every fixed-crop image once (VAE, or the
        latent cache) and every caption that never changes once (frozen text encoders)."""
        if self.run_dir is not None:
            check_room_for_states(self.run_dir, self.state_bytes(), self.config.steps, self.config.save_every)
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
        if self.config.zero_terminal_snr and not is_zero_terminal(self.bridge.alphas_cumprod().cpu()):
            host.emit(Notice("zero_terminal_snr: trained on the rescaled schedule; sample the result through "
                             "ModelSamplingDiscrete with zsnr on so sampling uses the same schedule."))

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch(self.config.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: each trains gradient_accumulation_steps batches on every process."""
        return math.ceil(self.batches_per_epoch / (self.config.gradient_accumulation_steps * self.parallel.world_size))

    # ----- resume -----
    def resume(self, folder: Path) -> None:
        # Outside inference mode: loaded optimizer state is updated in place by every step.
        with torch.inference_mode(False):
            state = load_state(folder)
            self._check_resumable(folder, TrainConfig.from_dict(state.config))
            self.network.load_kohya_state_dict(state.raw_network or state.network)
            self.optimizer.load_state_dict(state.optimizer)
            if state.scheduler is not None:
                self.scheduler.load_state_dict(state.scheduler)
            self.precision.load_state_dict(state.scaler)
            if self.ema and state.ema:
                self.ema.load_state_dict(state.ema)
            self.generator.set_state(state.generator)
        self.step, self.order, self.position = state.step, state.order, state.position
        if state.scheduler is None:
            self.scheduler.last_epoch = self.step  # format-1 states: a constant LR, so only the count matters
        if state.dataset and state.dataset != self.plan_fingerprint():
            log.warning("TuneKit: the dataset changed since %s was saved: a new epoch starts.", folder)
            self.order, self.position = [], 0
        self._last_checkpoint = folder

    # Settings a resumed run must share with the saved one: they shape the weights or the optimizer state.
    RESUME_MUST_MATCH = ("rank", "alpha", "targets", "network", "conv_rank", "conv_alpha", "target_pattern",
                         "lokr_factor", "optimizer", "ema_decay", "mixed_precision", "text_encoders",
                         "num_vectors", "pivotal")

    def _check_resumable(self, folder: Path, saved: TrainConfig) -> None:
        differ = [name for name in self.RESUME_MUST_MATCH if getattr(saved, name) != getattr(self.config, name)]
        if differ:
            was = ", ".join(f"{name} {getattr(saved, name)!r}" for name in differ)
            raise ConfigError([
                (f"cannot resume {folder}: it was trained with {was}. Use those settings, or a new run name to "
                 f"start fresh.")
            ])

    # ----- training -----
    def run(self, host: Host) -> TrainResult:
        if not self._prepared:
            self.prepare(host)
        try:
            # Hosts may call us under inference mode (ComfyUI runs every node in it).
            with torch.inference_mode(False), torch.enable_grad(), self._determinism(), self._training_model():
                if self._keeps_good_states:
                    self._good = self._state()
                self._call_step_hooks(host)
                while self.step < self.config.steps:
                    if self.parallel.any(host.should_stop()):
                        return self._stop_early(host)
                    self._train_step(host)
                    self._call_step_hooks(host)
                    if self.parallel.any(bool(self._finish_reason)):  # a hook of one process decides for all
                        break
                    if self._save_due():
                        self._save(host, partial=True)
        except TrainingDivergedError:
            self._keep_progress(host, diverged=True)
            raise
        except SaveError:  # says which state is kept; saving again would only fail again
            raise
        except BaseException:
            # Cancelled from inside the model (ComfyUI raises in its ops), out of memory...: keep every completed step.
            self._keep_progress(host)
            raise
        self._read_losses(newest=self.step)
        if self._finish_reason:
            host.emit(Notice(f"Finished at step {self.step} of {self.config.steps}: {self._finish_reason}."))
        return TrainResult(self.step, False, self.losses, self._last_checkpoint)

    def finish_early(self, reason: str) -> None:
        """For a step hook: the run ends after this step as a finished one (saved and exported), for `reason`."""
        self._finish_reason = reason

    def use_weights_of(self, step: int, weights: dict[str, torch.Tensor]) -> None:
        """For a step hook at the last step: what is saved and exported from now on holds `weights` (the trainable's
        state_dict as a save would have written it at `step`); the raw weights stay, so a resume continues them."""
        self._chosen = (step, weights)

    def _training_model(self):
        kwargs = {"gradient_checkpointing": True} if self.config.gradient_checkpointing else {}
        if self.feed.text_trains:
            kwargs["text"] = True
        return self.bridge.training(self.network.attach, self.network.detach, **kwargs)

    @contextmanager
    def _determinism(self):
        """torch's deterministic algorithms for the run only (global state, restored after)."""
        if not self.config.deterministic:
            yield
            return
        before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)

    def _call_step_hooks(self, host: Host) -> None:
        for hook in self.step_hooks:
            hook(self, host)

    def _train_step(self, host: Host) -> None:
        began = time.perf_counter()
        self._step_start = (self.generator.get_state(), list(self.order), self.position)
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = self.config.gradient_accumulation_steps
        step_loss = torch.zeros((), device=self.bridge.device)
        for micro in range(accumulation):
            with torch.no_grad():
                batch, number = self._next_batch(self.step * accumulation + micro)
            loss = self._loss(batch, self._batch_generator(number))
            self.precision.backward(loss / accumulation)
            step_loss += loss.detach() / accumulation
        self.parallel.average_gradients(self._trained_parameters())
        self._unread.append(step_loss)
        if self._loss_due():
            self._read_losses(newest=self.step + 1)
            if self._keeps_good_states:
                self._good = self._state(rolled_back=True)
        rate = self.scheduler.get_last_lr()[0]  # this step's learning rate (the schedule moves on below)
        self._optimizer_step()
        self._step_start = None
        self.step += 1
        latest = self.losses[-1] if self.losses else float("nan")
        host.emit(StepDone(self.step, self.config.steps, latest, rate, time.perf_counter() - began))

    def _optimizer_step(self) -> None:
        if self.config.max_grad_norm:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trained_parameters(), self.config.max_grad_norm)
        self.precision.step(self.optimizer)
        self.scheduler.step()
        if self.ema:
            self.ema.update()

    def _loss_due(self) -> bool:
        """Read the loss back (a device sync) every loss_every steps and at the last step."""
        done = self.step + 1
        return done % self.config.loss_every == 0 or done == self.config.steps

    def _read_losses(self, newest: int) -> None:
        """One host sync for the steps since the last read (`newest`: the 1-based number of the last of
        them); a non-finite loss stops the run before the running step's update."""
        if not self._unread:
            return
        values = self.parallel.average(torch.stack(self._unread)).tolist()
        first_step = newest + 1 - len(values)
        self._unread = []
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingDivergedError(self._divergence_message(value, first_step + offset))
        self.losses.extend(values)

    def _divergence_message(self, value: float, step: int) -> str:
        config = self.config
        advice = f"Lower learning_rate (now {config.effective_unet_lr}), e.g. by 10x"
        if config.mixed_precision == "fp16":
            advice += ", or use mixed_precision 'bf16' or 'fp32' (fp16 overflows more easily)"
        if not config.max_grad_norm:
            advice += ", or set max_grad_norm to 1.0"
        return (f"The loss became {value} at step {step}: training diverged. The last good state is kept. "
                f"{advice}.")

    def _loss(self, batch: list[Example], generator: torch.Generator) -> torch.Tensor:
        device = self.bridge.device
        latents = torch.stack([example.latent for example in batch])
        noise = draw_noise(latents, generator, self.config.noise_offset)
        timesteps = sample_timesteps(len(batch), len(self.alphas), generator, self.timestep_weights)
        noisy = add_noise(latents, noise, self.alphas, timesteps)
        target = training_target(self.prediction_type, latents, noise, self.alphas, timesteps)
        with self.precision.autocast():
            prediction = self.bridge.predict(
                noisy.to(device), timesteps.to(device), [e.prompt for e in batch], [e.size for e in batch]
            )
        losses = per_sample_mse(prediction, target.to(device), _masks(batch, prediction.shape[-2:]))
        return (losses * self._loss_weights(batch, timesteps).to(device)).mean()

    def _loss_weights(self, batch: list[Example], timesteps: torch.Tensor) -> torch.Tensor:
        """Each image's weight (prior_loss_weight), times its Min-SNR-gamma weight where that is on."""
        weights = torch.tensor([example.weight for example in batch], dtype=torch.float32)
        if self.config.min_snr_gamma:
            weights = weights * min_snr_weights(snr(self.alphas, timesteps), self.config.min_snr_gamma, self.prediction_type)
        return weights

    def evaluate(self, seed: int = 1234, draws: int = 4) -> float:
        """Mean loss over every image at fixed noise and timesteps: comparable between steps and runs
        (with the weights that would be saved: EMA or schedule-free averages)."""
        if not self._prepared:
            raise RuntimeError("call prepare() before evaluate()")
        generator = torch.Generator().manual_seed(seed)
        losses = []
        with torch.inference_mode(False), torch.no_grad(), self._weights_to_save(), self._training_model():
            examples = self.feed.fixed_examples()  # inside: trained text encoders encode the captions
            for _ in range(draws):
                for example in examples:
                    losses.append(self._plain_loss(example, generator))
        return sum(losses) / len(losses)

    def _plain_loss(self, example: Example, generator: torch.Generator) -> float:
        """Unweighted epsilon/v MSE at uniform timesteps (no Min-SNR, bias or offset): comparable across options."""
        latents = example.latent[None]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(1, len(self.alphas), generator)
        noisy = add_noise(latents, noise, self.alphas, timesteps)
        target = training_target(self.prediction_type, latents, noise, self.alphas, timesteps)
        device = self.bridge.device
        prediction = self.bridge.predict(noisy.to(device), timesteps.to(device), [example.prompt], [example.size])
        return per_sample_mse(prediction, target.to(device)).item()

    def _next_batch(self, micro_step: int) -> tuple[list[Example], int]:
        """This process's batch of a micro-step, and its number. Each micro-step takes the next batch of the
        order for each process (one process: one batch), in turn; this process keeps its own."""
        for rank in range(self.parallel.world_size):
            indices = self._next_indices()
            if rank == self.parallel.rank:
                mine = indices
        number = micro_step * self.parallel.world_size + self.parallel.rank
        epoch = number // self.batches_per_epoch + 1
        total = self.config.steps * self.config.gradient_accumulation_steps * self.parallel.world_size
        return self.feed.batch(mine, number, epoch, total), number

    def _next_indices(self) -> list[int]:
        """The plan items of the next batch (one bucket). Batches are drawn once per epoch; the order and
        position are saved, and every random choice inside a batch is seeded by its number, so resume is exact."""
        if self.position >= len(self.order):
            self.order = epoch_batches(self.plan, self.config.batch_size, self.generator)
            self.position = 0
        self.position += 1
        return self.order[self.position - 1]

    def _batch_generator(self, batch_number: int) -> torch.Generator:
        """The generator of a batch's noise and timesteps, seeded by the run's seed and the batch's number:
        the same draws whichever process trains the batch, and after a resume."""
        digest = hashlib.sha256(f"tunekit:noise:{self.config.seed}:{batch_number}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def plan_fingerprint(self) -> str:
        """Identifies the planned items (content, bucket, repeats): a saved order is only valid for them."""
        parts = [(i.image.digest or i.image.source, i.assignment.bucket, i.repeats) for i in self.plan.items]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    # ----- the weights to save -----
    @contextmanager
    def _weights_to_save(self):
        """Inside: the trainable holds what is saved and sampled (EMA averages when save_ema, schedule-free's
        averaged point; the weights a hook chose, see use_weights_of); after: exactly the raw training weights again
        (copied back, never recomputed)."""
        if self._chosen is not None:
            raw = {name: value.detach().clone() for name, value in self.network.state_dict().items()}
            self.network.load_state_dict(self._chosen[1])
            try:
                yield
            finally:
                self.network.load_state_dict(raw)
        elif self.ema and self.config.save_ema:
            raw = self.ema.swapped_in()
            try:
                yield
            finally:
                self.ema.restore(raw)
        elif is_schedule_free(self.optimizer):
            parameters = self._trained_parameters()
            raw = [p.detach().clone() for p in parameters]
            self.optimizer.eval()
            try:
                yield
            finally:
                with torch.no_grad():
                    torch._foreach_copy_([p.data for p in parameters], raw)
                for group in self.optimizer.param_groups:
                    group["train_mode"] = True
        else:
            yield

    @contextmanager
    def weights_to_save(self):
        """Inside: the trainable holds what a save writes (see _weights_to_save), outside inference mode."""
        with torch.inference_mode(False), self._weights_to_save():
            yield

    def _saved_differs_from_raw(self) -> bool:
        return self._chosen is not None or bool(self.ema and self.config.save_ema) or is_schedule_free(self.optimizer)

    @property
    def result_step(self) -> int:
        """The step whose weights a save writes: the chosen one (use_weights_of), else the last."""
        return self._chosen[0] if self._chosen else self.step

    # ----- saving -----
    def state_bytes(self) -> int:
        """About what one saved state takes on disk: the weights in fp32 (twice where the saved ones are EMA or
        averaged weights), the optimizer state, the EMA, and the file headers of each of those tensors."""
        trained = self._trained_parameters()
        copies, emas = (2 if self._saved_differs_from_raw() else 1), (1 if self.ema else 0)
        weights = sum(p.numel() for p in trained) * 4
        # Saved tensors per trained one: its copies, EMA, optimizer state, and one for a step count or LoRA alpha.
        entries = sum(copies + emas + 1 + len(state_tensors(self.config.optimizer, p)) for p in trained)
        return (copies + emas) * weights + optimizer_state_bytes(self.config.optimizer, trained) \
            + entries * TENSOR_HEADER_BYTES

    def _save_due(self) -> bool:
        every = self.config.save_every
        return bool(every) and self.step % every == 0 and self.step < self.config.steps

    def _state(self, rolled_back: bool = False) -> TrainState:
        """A snapshot of everything a resume needs (copies, so later steps do not change it). `rolled_back`:
        taken inside a step before its update: the state as the step began."""
        generator, order, position = self._step_start if rolled_back else (self.generator.get_state(), self.order, self.position)
        with torch.inference_mode(False), self._weights_to_save():
            artefact = self.network.kohya_state_dict(torch.float32)
        with torch.inference_mode(False):
            return TrainState(
                step=self.step,
                network=artefact,
                optimizer=copy.deepcopy(self.optimizer.state_dict()),
                generator=generator.clone(),
                order=list(order),
                position=position,
                config=self.config.to_dict(),
                dataset=self.plan_fingerprint(),
                raw_network=self.network.kohya_state_dict(torch.float32) if self._saved_differs_from_raw() else None,
                scheduler=copy.deepcopy(self.scheduler.state_dict()),
                scaler=copy.deepcopy(self.precision.state_dict()),
                ema=copy.deepcopy(self.ema.state_dict()) if self.ema else None,
                config_toml=self.config.to_toml() + self.run_toml,
            )

    def _save(self, host: Host, partial: bool, state: TrainState | None = None) -> Path | None:
        if self.run_dir is None:
            return None
        state = state or self._state()
        self._last_checkpoint = save_state(self.run_dir, state)
        write_config(self.run_dir, state.config_toml)
        host.emit(CheckpointSaved(self._last_checkpoint, state.step, partial))
        return self._last_checkpoint

    def _stop_early(self, host: Host) -> TrainResult:
        self._read_losses(newest=self.step)
        folder = self._save(host, partial=True)
        host.emit(Notice(f"Training stopped at step {self.step}/{self.config.steps}; resumable state: {folder}"))
        return TrainResult(self.step, True, self.losses, folder)

    @property
    def _keeps_good_states(self) -> bool:
        """With loss_every > 1 a NaN is seen late, so each finite read copies the state (the one to save after
        a NaN). Not for large trainables (a full fine-tune): after their NaN the last saved state stays."""
        if self.config.loss_every == 1 or self.run_dir is None:
            return False
        size = sum(p.numel() * p.element_size() for p in self._trained_parameters())
        return 3 * size <= GOOD_STATE_COPY_LIMIT  # weights and about two optimizer tensors per weight

    def _keep_progress(self, host: Host, diverged: bool = False) -> None:
        """Save the last good state: the last completed step (a half-done one rolled back); after a
        non-finite loss read late (loss_every > 1), the copy at the last finite read, or if none was
        kept (a large trainable), nothing new: the last saved state stays."""
        if diverged and self.config.loss_every > 1 and self._good is None:
            host.emit(Notice(f"Training diverged; the last saved state is kept: {self._last_checkpoint}"))
            return
        if self._step_start is not None:
            generator_state, self.order, self.position = self._step_start
            self.generator.set_state(generator_state)
            self._step_start = None
        try:
            folder = self._save(host, partial=True, state=self._good if diverged else None)
        except SaveError as error:
            host.emit(Notice(str(error)))
            return
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
        """The LoRA as kohya tensors (fp16; the EMA weights when save_ema) and its `ss_*` metadata."""
        captions = [image.caption for image in self.dataset.images]
        metadata = lora_metadata(
            self.bridge.family,
            self.config,
            output_name=output_name,
            steps_done=self.result_step,
            num_images=len(captions),
            tag_frequency=tag_frequency(captions),
            started_at=self.started_at,
            prediction_type=self.bridge.prediction_type,
            optimizer=optimizer_name(self.optimizer),
            zero_terminal_snr=is_zero_terminal(self.alphas),
            processes=self.parallel.world_size,
        )
        # Pivotal tuning exports its LoRA; the embedding is a file of its own (trainer/embeddings.py).
        network = self.network.lora if isinstance(self.network, PivotalTuning) else self.network
        with torch.inference_mode(False), self._weights_to_save():
            tensors = network.kohya_state_dict(EXPORT_DTYPE)
        return tensors, metadata


def _masks(batch: list[Example], latent_size) -> torch.Tensor | None:
    if all(example.mask is None for example in batch):
        return None
    return torch.stack([example.mask if example.mask is not None else torch.ones(1, *latent_size) for example in batch])
