"""Train LoRA and Save LoRA: thin shells over trainer.TrainSession and the kohya writer."""

import logging

import comfy.model_management
import comfy.sd
from comfy_api.latest import io, ui

from ..trainer.adapters import ALGORITHMS, TARGET_PRESETS
from ..trainer.adapters.kohya import save_lora
from ..trainer.checkpoints import latest_run_state
from ..trainer.config import TEXT_ENCODER_SETS, TrainConfig
from ..trainer.errors import SaveError
from ..trainer.files import unused_path
from ..trainer.memory import explained_out_of_memory
from ..trainer.session import TrainResult, TrainSession
from .bridge import ComfyModelBridge
from .dataset_nodes import DatasetType
from .headless import node_run_table
from .host import ComfyHost
from .lora_type import KohyaLoRA
from .memory_fit import fit_session, out_of_memory_types
from .monitor_nodes import MonitorType, build_monitor, split_for
from .network_nodes import NetworkType
from .options_nodes import OPTIONS_INPUT_HELP, OptionsType
from .paths import checked_name, latent_cache_directory, loras_directory, run_directory

log = logging.getLogger("tunekit")
CATEGORY = "TuneKit/train"
DEFAULTS = TrainConfig()


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitTrainLoRA",
            display_name="Train LoRA",
            category=CATEGORY,
            description=(
                "Trains a LoRA on the MODEL your graph already loaded (no second copy of its weights) and returns "
                "the MODEL with it applied, ready for KSampler. Cancel stops within a step and keeps a resumable state."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The loaded model to train on (SD 1.x or SDXL). It is not modified."),
                io.Clip.Input("clip", tooltip="The model's text encoder(s), used to encode the captions (frozen unless "
                              "text_encoders trains them; never modified)."),
                io.Vae.Input("vae", tooltip="The model's VAE, used once to encode the training images."),
                DatasetType.Input("dataset", tooltip="From a TuneKit dataset node."),
                io.String.Input("run_name", default="tunekit_lora",
                                tooltip="Names the LoRA and its folder of resumable states in output/tunekit/."),
                io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=1_000_000,
                             tooltip="Optimizer steps. Roughly 100 per training image is a common start."),
                io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate. 1e-4 is a safe start; lower it if the loss jumps or becomes NaN."),
                io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=256,
                             tooltip="LoRA rank: capacity and file size. 4-32 is typical."),
                io.Float.Input("alpha", default=DEFAULTS.alpha, min=0.01, max=1024.0, step=0.5,
                               tooltip="Scales the LoRA by alpha / rank. Equal to the rank means scale 1."),
                io.Int.Input("batch_size", default=DEFAULTS.batch_size, min=1, max=64,
                             tooltip="Images per step. Larger needs more memory."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Images are resized and centre-cropped to this square size (512 for SD 1.x, 1024 for SDXL)."),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default=DEFAULTS.targets,
                               tooltip="'transformer': every linear layer of the attention blocks (kohya's default). "
                                       "'attention': only the q/k/v/out projections (smaller, faster). "
                                       "'all': every linear and conv layer, res blocks too (kohya LoCon; what "
                                       "ComfyUI's own trainer trains)."),
                io.Combo.Input("text_encoders", options=list(TEXT_ENCODER_SETS), default="none", optional=True,
                               tooltip="LoRA on the text encoder(s) too, so the trigger word itself learns: 'all' (SD 1.x: "
                                       "its encoder; SDXL: CLIP-L and CLIP-G), 'te1' (SDXL: CLIP-L only), 'te2' (SDXL: "
                                       "CLIP-G only). Captions are then encoded every step (no text cache): slower, and "
                                       "the CLIP output carries the trained encoder."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-6, optional=True,
                               tooltip="Learning rate of the text-encoder LoRA (SDXL: CLIP-L); 0: learning_rate. Often "
                                       "lower than the UNet's, e.g. 5e-5."),
                io.Float.Input("text_encoder_2_lr", default=0.0, min=0.0, max=1.0, step=1e-6, optional=True,
                               tooltip="SDXL's CLIP-G learning rate; 0: text_encoder_lr."),
                # No "randomize after queue": a new seed would retrain on every queued prompt.
                io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds the LoRA's initialisation, noise, timesteps and image order."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Save a resumable state every N steps (0: only at the end and on Cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the latest saved state of this run_name (after a Cancel, or to train longer)."),
                MonitorType.Input("monitor", optional=True,
                                  tooltip="From Sample & Validate Settings: samples and validation loss every N steps, "
                                          "shown on this node and saved in the run folder."),
                io.Combo.Input("network", options=list(ALGORITHMS), default=DEFAULTS.network, optional=True,
                               tooltip="The adapter algorithm. " + " ".join(
                                   f"'{name}': {spec.cost}." for name, spec in ALGORITHMS.items())
                                       + " LoHa, LoKr and DoRA save LyCORIS keys, which ComfyUI and A1111/Forge load."),
                OptionsType.Input("options", optional=True,
                                  tooltip=OPTIONS_INPUT_HELP),
                NetworkType.Input("network_settings", optional=True,
                                  tooltip="From LoRA Network Settings: conv rank/alpha, a custom target pattern, LoKr's "
                                          "factor, or a LoRA file to continue training."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The input CLIP, with the trained text-encoder LoRA applied "
                                                         "where text_encoders trained one."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="The LoRA (kohya format) for Save LoRA."),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, run_name, steps, learning_rate, rank, alpha, batch_size,
                resolution, targets, seed, save_every, resume, text_encoders="none", text_encoder_lr=0.0,
                text_encoder_2_lr=0.0, monitor=None, network="lora", network_settings=None, options=None):
        config = TrainConfig(steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha, batch_size=batch_size,
                            resolution=resolution, seed=seed, targets=targets, save_every=save_every,
                            text_encoders=text_encoders, text_encoder_lr=text_encoder_lr,
                            text_encoder_2_lr=text_encoder_2_lr, network=network, **(network_settings or {}), **(options or {}))
        dataset, held_out = split_for(monitor, dataset)
        bridge, node_id = ComfyModelBridge(model, clip, vae), cls.hidden.unique_id
        session, host = start_session(bridge, dataset, config, run_name, resume, node_id)
        # Before any work: the run fits the device's free memory, or auto changes settings, or it stops here.
        session, memory_report = fit_session(session, lambda fitted: start_session(
            bridge, dataset, fitted, run_name, resume, node_id)[0])
        session.run_toml = node_run_table(session, model, clip, run_name,
                                          validation=monitor and (monitor.settings, held_out))  # `tunekit train` re-runs it
        watcher = build_monitor(monitor, session, held_out, vae, latent_cache_directory()) if monitor else None
        if watcher:
            session.step_hooks.append(watcher)
        result, unsaved = train_to_end(session, host, run_name)
        lora = KohyaLoRA(*session.export(run_name))
        trained_model, trained_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        report = training_report(session, result.losses) + (f"; {watcher.summary()}" if watcher else "") \
            + (f" {memory_report}" if memory_report else "") + (f" {unsaved}" if unsaved else "")
        log.info("TuneKit: %s", report)
        return io.NodeOutput(trained_model, trained_clip, lora, report, ui=ui.PreviewText(report))


def train_to_end(session: TrainSession, host: ComfyHost, run_name: str) -> tuple[TrainResult, str]:
    """Run the session to its last step and save it; the result and, where the final state could not be
    written, a sentence saying so for the node's report. Cancel keeps a resumable state and re-raises
    ComfyUI's interrupt; an out-of-memory error says which settings to lower."""
    try:
        with explained_out_of_memory(session, out_of_memory_types()):
            result = session.run(host)
    except comfy.model_management.InterruptProcessingException:
        _log_cancelled(session, run_name)
        raise
    if result.stopped_early:
        _log_cancelled(session, run_name)
        raise comfy.model_management.InterruptProcessingException()
    try:
        session.save_final(host)
    except SaveError as error:
        # Every step is done and the result is in memory: the node still returns it (Save LoRA can write it
        # once there is room); only resuming from the last step is lost.
        log.warning("TuneKit: %s", error)
        return result, f"The final training state was not saved: {error}"
    return result, ""


def _log_cancelled(session: TrainSession, run_name: str) -> None:
    log.warning("TuneKit: training cancelled at step %d. To continue, queue again with resume=true and run_name "
                "'%s'. Resumable state: %s", session.step, run_name, session.last_checkpoint)


def start_session(bridge, dataset, config, run_name, resume, node_id, trainable=None):
    base_dir = run_directory(run_name)
    previous = latest_run_state(base_dir)
    if resume and previous:
        session = TrainSession(bridge, dataset, config, previous.parent, latent_cache_directory(), trainable)
        session.resume(previous)
        log.info("TuneKit resumes run '%s' at step %d from %s", run_name, session.step, previous)
    else:
        if resume:
            log.info("TuneKit: no saved state for run '%s' yet; starting fresh.", run_name)
        session = TrainSession(bridge, dataset, config, unused_path(base_dir), latent_cache_directory(), trainable)
    return session, ComfyHost(node_id, config.steps)


def training_report(session: TrainSession, losses: list[float]) -> str:
    window = max(1, len(losses) // 10)
    start = sum(losses[:window]) / window if losses else float("nan")
    end = sum(losses[-window:]) / window if losses else float("nan")
    return (f"Trained {session.step} steps on {len(session.dataset)} images; mean loss first {window} steps "
            f"{start:.4f}, last {window} steps {end:.4f}. Run folder: {session.run_dir}")


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitSaveLoRA",
            display_name="Save LoRA",
            category=CATEGORY,
            description="Writes the LoRA into models/loras (kohya format with metadata) where LoraLoader lists it. Never overwrites.",
            is_output_node=True,
            inputs=[
                io.Custom("LORA_MODEL").Input("lora", tooltip="From Train LoRA."),
                io.String.Input("filename", default="tunekit_lora",
                                tooltip="File name in models/loras; an existing file is kept and a _2, _3... suffix added."),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, lora, filename):
        name = checked_name(filename.removesuffix(".safetensors"), "filename")
        path = unused_path(loras_directory() / f"{name}.safetensors")
        metadata = {**getattr(lora, "metadata", {}), "ss_output_name": path.stem, "modelspec.title": path.stem}
        save_lora(path, dict(lora), metadata)
        log.info("TuneKit saved LoRA %s", path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"Saved {path.name} in {path.parent}"))
