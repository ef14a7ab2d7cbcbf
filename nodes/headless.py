"""`tunekit train --config run.toml`: the Train LoRA node's run without a server.

ComfyUI's own loading code used as a library (comfy.sd.load_checkpoint_guess_config) and the same
ComfyModelBridge and TrainSession as the node; a logging host whose Ctrl-C is the node's Cancel. `comfy`
is imported only inside `train()`, after --comfyui put a checkout on sys.path, so a Python without it
gets a message rather than an ImportError; nothing here needs a running ComfyUI (no server, folder_paths
or comfy_api).
"""

import dataclasses
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from ..trainer.adapters.kohya import save_lora
from ..trainer.checkpoints import latest_run_state
from ..trainer.config import TrainConfig
from ..trainer.data import export_kohya_toml, read_kohya_toml, scan_image_folder, scan_legacy_folders
from ..trainer.data.folder import is_legacy_layout, list_images
from ..trainer.embeddings import TokenEmbedding, save_pivotal_lora, save_trained_embedding
from ..trainer.errors import TuneKitError
from ..trainer.events import CheckpointSaved, Event, Notice, StepDone, ValidationLoss
from ..trainer.files import unused_path
from ..trainer.finetune import FullFineTune
from ..trainer.memory import common_settings, explained_out_of_memory
from ..trainer.monitor import Monitor, MonitorSettings, ValidationSet, split_validation, validation_dataset
from ..trainer.optional import require
from ..trainer.parallel import DataParallel
from ..trainer.runfile import RunFile, run_table, validation_table
from ..trainer.session import TrainSession
from ..trainer.text_encoders import chosen_encoders

log = logging.getLogger("tunekit")
LOG_EVERY = 10


class ConsoleHost:
    """Progress to the log; the first Ctrl-C asks the session to stop after its step (it saves a resumable
    state), a second one interrupts at once (the session still keeps the last completed step)."""

    def __init__(self, every: int = LOG_EVERY):
        self.every, self.stop_requested = every, False

    def emit(self, event: Event) -> None:
        if isinstance(event, StepDone):
            if event.step % self.every == 0 or event.step == event.total_steps:
                log.info("step %d/%d loss %.4f (%.2f s/step)", event.step, event.total_steps, event.loss, event.seconds)
        elif isinstance(event, CheckpointSaved):
            log.info("saved the %s training state at step %d: %s", "partial" if event.partial else "final",
                     event.step, event.path)
        elif isinstance(event, Notice):
            log.info("%s", event.message)
        elif isinstance(event, ValidationLoss):
            log.info("step %d validation loss %.4f", event.step, event.loss)

    def should_stop(self) -> bool:
        return self.stop_requested

    @contextmanager
    def ctrl_c_cancels(self):
        def cancel(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("Ctrl-C: stopping after this step and saving a resumable state (Ctrl-C again: at once).")

        previous = signal.signal(signal.SIGINT, cancel)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(run: RunFile, resume: bool = False, comfyui: Path | None = None, cpu: bool = False,
          every: int = LOG_EVERY) -> str:
    """Train the run; returns the report. A cancelled run raises KeyboardInterrupt after saving its state.
    Started by `accelerate launch` (or torchrun) on several processes, they train it together."""
    with launched_processes(cpu) as parallel:
        return _train(run, resume, comfyui, cpu, every, parallel)


@contextmanager
def launched_processes(cpu: bool):
    """This process's place among those a launcher started (WORLD_SIZE > 1): accelerate's PartialState joins
    their process group (NCCL between GPUs, gloo on the CPU) and gives this process its own GPU before
    ComfyUI picks a device. The other processes log only warnings. One process: nothing to join."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield DataParallel()
        return
    state = require("accelerate", "training on several processes").PartialState(cpu=cpu)
    if not state.is_main_process:
        log.setLevel(logging.WARNING)
    try:
        yield DataParallel.from_process_group()
    finally:
        state.destroy_process_group()


def _train(run: RunFile, resume: bool, comfyui: Path | None, cpu: bool, every: int, parallel: DataParallel) -> str:
    import_comfy(comfyui, cpu)
    from .bridge import ComfyModelBridge
    from .memory_fit import out_of_memory_types

    dataset, held_out = validation_split(run, load_dataset(run))
    log.info("dataset: %s", dataset.summary())
    model, clip, vae = load_checkpoint(run.checkpoint)
    bridge, host = ComfyModelBridge(model, clip, vae), ConsoleHost(every)
    trainable = full_finetune(model, bridge, run.config) if run.method == "finetune" else None
    if run.method == "embedding":
        trainable = TokenEmbedding.from_init_word(bridge, run.name, run.config.init_word, run.config.num_vectors)
    session = _fitted_session(bridge, dataset, run, resume, trainable, parallel)
    session.run_toml = run.run_table()
    monitor = None
    if held_out is not None and parallel.is_main:  # the others follow its decision to stop (session.run)
        monitor = validation_monitor(run.validation, session, held_out)
        session.step_hooks.append(monitor)
    if parallel.world_size > 1:
        log.info("training on %d processes: each step trains %d batches of %d", parallel.world_size,
                 parallel.world_size * run.config.gradient_accumulation_steps, run.config.batch_size)
    with host.ctrl_c_cancels(), explained_out_of_memory(session, out_of_memory_types()):
        result = session.run(host)
    if not parallel.is_main:
        return f"{parallel}: trained {session.step} steps; the first process saves the results."
    if result.stopped_early:
        log.warning("cancelled at step %d; state kept in %s. To continue: tunekit train --config %s --resume",
                    session.step, session.last_checkpoint, run.path)
        raise KeyboardInterrupt
    session.save_final(host)
    if trainable is None:
        saved = save_run_lora(session, run.name)
    elif run.method == "embedding":
        saved = save_run_embedding(session, trainable, run.name)
    else:
        with session.weights_to_save():  # the EMA averages where those are what is saved
            trained, trained_clip = finetuned_models(model, clip, trainable)
        saved = write_checkpoint(unused_path(session.run_dir / f"{run.name}.safetensors"), trained, trained_clip, vae,
                                 session.config, session.result_step)
    return _report(result.losses, session.step, saved) + (f"; {monitor.summary()}" if monitor else "")


def _fitted_session(bridge, dataset, run: RunFile, resume: bool, trainable, parallel: DataParallel) -> TrainSession:
    """As the nodes: the run fits the free memory, or 'auto' changes settings, or it stops; with several
    processes, all take the same settings."""
    from .memory_fit import fit_session

    def start(config: TrainConfig) -> TrainSession:
        return _start_session(bridge, dataset, dataclasses.replace(run, config=config), resume, trainable, parallel)

    session = fit_session(start(run.config), start)[0]
    if (agreed := common_settings(parallel.gather(session.config))) != session.config:
        session = start(agreed)
    return session


def import_comfy(comfyui: Path | None, cpu: bool) -> None:
    """Make ComfyUI's `comfy` package importable (from `comfyui`, a checkout, where given); `cpu`: as
    ComfyUI's --cpu, set before its model management picks a device."""
    if comfyui is not None:
        if not (comfyui / "comfy" / "sd.py").is_file():
            raise TuneKitError(f"--comfyui '{comfyui}' is not a ComfyUI folder (it has no comfy/sd.py): give the folder "
                               f"that holds ComfyUI's main.py.")
        sys.path.insert(0, str(comfyui.resolve()))
    try:
        import comfy.cli_args
    except ImportError as error:
        raise TuneKitError(
            f"tunekit train loads the model with ComfyUI's own code, and this Python ({sys.executable}) cannot import "
            f"ComfyUI's 'comfy' package ({error}): run it with ComfyUI's Python (the portable build: "
            f"python_embeded\\python.exe -m tunekit ...), or add --comfyui PATH with the folder of a ComfyUI checkout."
        ) from error
    if cpu:
        comfy.cli_args.args.cpu = True


def load_checkpoint(path: Path):
    """MODEL, CLIP and VAE exactly as ComfyUI's CheckpointLoaderSimple loads them."""
    import comfy.sd

    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    except RuntimeError as error:
        raise TuneKitError(f"ComfyUI cannot load the checkpoint {path}: {error}") from error
    if model is None or clip is None or vae is None:
        raise TuneKitError(f"{path} lacks a UNet, text encoder or VAE: give a full SD 1.x / SDXL checkpoint.")
    return model, clip, vae


def load_dataset(run: RunFile, path: Path | None = None):
    """A kohya dataset TOML, or a folder read as the Dataset from Folder node reads it (`path`: instead of the
    run's dataset)."""
    path = path or run.dataset
    if path.suffix.lower() == ".toml":
        return read_kohya_toml(path)
    if is_legacy_layout(path) and not list_images(path, False):
        return scan_legacy_folders(path, run.caption_extension, run.trigger_word)
    return scan_image_folder(path, run.caption_extension, run.trigger_word)


def validation_split(run: RunFile, dataset):
    """(what trains, what validates) as Sample & Validate splits them: a separate validation set, or
    validation_count images held out of the dataset; (dataset, None) without a [validation] table."""
    if run.validation is None:
        return dataset, None
    if run.validation_dataset is not None:
        return dataset, validation_dataset(load_dataset(run, run.validation_dataset))
    return split_validation(dataset, run.validation.validation_count, run.validation.validation_seed)


def validation_monitor(settings: MonitorSettings, session: TrainSession, held_out) -> Monitor:
    """The validation loss every N steps (validation.csv in the run folder), with its patience and keep_best;
    no samples headless."""
    validation = ValidationSet(session.bridge, held_out, session.config.resolution, settings.validation_seed,
                               settings.draws, text_trains=session.feed.text_trains)
    validation.prepare()
    return Monitor(settings, validation, log_dir=session.run_dir)


def _start_session(bridge, dataset, run: RunFile, resume: bool, trainable=None,
                   parallel: DataParallel | None = None) -> TrainSession:
    config = run.config
    base_dir = run.output_dir / run.name
    previous = latest_run_state(base_dir) if resume else None
    if previous is None:
        if resume:
            log.info("no saved state of run '%s' in %s yet: starting fresh.", run.name, run.output_dir)
        return TrainSession(bridge, dataset, config, unused_path(base_dir), trainable=trainable, parallel=parallel)
    session = TrainSession(bridge, dataset, config, previous.parent, trainable=trainable, parallel=parallel)
    session.resume(previous)
    log.info("resuming run '%s' at step %d from %s", run.name, session.step, previous)
    return session


def save_run_lora(session: TrainSession, name: str) -> Path:
    """The LoRA with its full kohya metadata, in the run folder (never over an existing file)."""
    path = unused_path(session.run_dir / f"{name}.safetensors")
    tensors, metadata = session.export(name)
    save_lora(path, tensors, {**metadata, "ss_output_name": path.stem, "modelspec.title": path.stem})
    return path


def save_run_embedding(session: TrainSession, embedding: TokenEmbedding, name: str) -> Path:
    """The embedding in the run folder (as Train Embedding saves it) and, with pivotal tuning, its LoRA
    beside it as `<name>_lora`."""
    path = save_trained_embedding(session, embedding, session.run_dir / f"{name}.safetensors")[0]
    if session.config.pivotal:
        lora = save_pivotal_lora(session, path, session.run_dir / f"{name}_lora.safetensors")[0]
        log.info("saved the pivotal-tuning LoRA %s (use it with embedding:%s)", lora, path.stem)
    return path


def full_finetune(model, bridge, config: TrainConfig | None = None) -> FullFineTune:
    """A training copy of every denoiser weight and of every weight of the text encoders `config.text_encoders`
    names, made from the weights this MODEL and CLIP sample with (their own patches applied)."""
    import comfy.model_management

    text = config is not None and config.text_encoders != "none"
    encoders = chosen_encoders(bridge.text_encoder_modules(), config) if text else None
    comfy.model_management.load_models_gpu([model, *([bridge.clip.patcher] if text else [])], force_full_load=True)
    return FullFineTune(bridge.denoiser_modules()[""], bridge.device, encoders)


def finetuned_models(model, clip, trainable: FullFineTune):
    """(MODEL, CLIP) with the trained weights: clones of the graph's; the CLIP only where its encoders trained."""
    trained = with_weights(model, trainable.trained_weights(device=model.offload_device))
    if not trainable.trains_text:
        return trained, clip
    return trained, clip_with_weights(clip, trainable.text_encoder_weights(device=clip.patcher.offload_device))


def with_weights(model, weights: dict):
    """A clone of `model` whose denoiser weights are `weights` ('set' patches: applied when it loads)."""
    trained = model.clone()
    trained.add_patches({f"diffusion_model.{name}": ("set", (tensor,)) for name, tensor in weights.items()}, 1.0, 1.0)
    return trained


def clip_with_weights(clip, encoders: dict):
    """A clone of `clip` whose text-encoder weights are `encoders` (name -> {transformers path: tensor}), as
    'set' patches in the dtype the CLIP keeps its weights in: the checkpoint writer saves what it samples with."""
    from .clip_text import clip_weight_key

    trained = clip.clone()
    host = trained.cond_stage_model.state_dict()
    patches = {}
    for encoder, weights in encoders.items():
        for path, tensor in weights.items():
            key = clip_weight_key(encoder, path)
            patches[key] = ("set", (tensor.to(host[key].dtype) if key in host else tensor,))
    if missing := set(patches) - set(trained.add_patches(patches, 1.0, 1.0)):
        raise TuneKitError(f"this ComfyUI's CLIP has no weight named {min(missing)} ({len(missing)} trained "
                           f"text-encoder weights unplaced): please report it with your ComfyUI version.")
    return trained


def write_checkpoint(path: Path, model, clip, vae, config: TrainConfig, steps_done: int) -> Path:
    """A single-file checkpoint CheckpointLoaderSimple and A1111 load, written by ComfyUI's own writer."""
    import comfy.sd

    metadata = {
        "modelspec.title": path.stem,
        "tunekit_method": "full_finetune",
        "tunekit_steps": str(steps_done),
        "tunekit_config": json.dumps(config.to_dict(), sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name that still ends in .safetensors: ComfyUI's writer picks the format by the suffix.
    temporary = path.with_name(f".{path.stem}.partial.safetensors")
    try:
        comfy.sd.save_checkpoint(str(temporary), model, clip, vae, metadata=metadata)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("TuneKit saved the fine-tuned checkpoint %s", path)
    return path


def _report(losses: list[float], steps: int, saved: Path) -> str:
    if not losses:
        return f"Nothing left to train: the run is at step {steps}. Saved: {saved}"
    window = max(1, len(losses) // 4)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    return (f"Trained {steps} steps; mean loss first {window} steps {first:.4f}, last {window} steps {last:.4f}. "
            f"Saved: {saved}")


# ----- what Train LoRA writes so its run re-runs here -----

def node_run_table(session: TrainSession, model, clip, run_name: str, method: str = "lora",
                   validation: tuple[MonitorSettings, object] | None = None) -> str:
    """The [run] table of a graph run: the checkpoint the MODEL came from (where that tells the whole story),
    the training dataset exported as a kohya TOML into the run folder, and output/tunekit as the folder a
    re-run's folder goes into (beside this run's, as a second graph run would). `validation`: Sample & Validate's
    settings and the images it validates on, exported as validation.toml for a [validation] table."""
    if session.run_dir is None:
        return ""
    dataset = export_kohya_toml(session.dataset, session.run_dir)
    table = run_table(run_name, checkpoint_file(model, clip), dataset, output_dir=session.run_dir.parent, method=method)
    settings, held_out = validation or (None, None)
    if held_out is None:
        return table
    exported = export_kohya_toml(held_out, session.run_dir, "validation.toml")
    return table + validation_table(dataclasses.replace(settings, validation_count=0), exported)


def checkpoint_file(model, clip) -> Path | None:
    """The file CheckpointLoaderSimple loaded the MODEL from (newer ComfyUI records it in cached_patcher_init;
    0.3.x does not), unless other nodes changed it since: a LoRA, a ModelSamplingDiscrete or a CLIP patch would be
    missing from a headless re-run, so the run file then leaves the checkpoint for the user to give."""
    init = getattr(model, "cached_patcher_init", None)
    if not init or getattr(init[0], "__name__", "") != "load_checkpoint_guess_config":
        return None
    changed = model.patches or model.object_patches or getattr(clip.patcher, "patches", None)
    if changed:
        log.info("TuneKit: the MODEL/CLIP carry changes beyond their checkpoint: the run file leaves [run] "
                 "checkpoint empty (give --checkpoint to re-run it headless).")
        return None
    return Path(init[1][0])
