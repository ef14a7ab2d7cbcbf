"""Fine-tune: a full fine-tune of the loaded MODEL's denoiser (optionally of the CLIP's text encoders too)
through the same TrainSession as Train LoRA, saved as a single-file checkpoint (models/checkpoints) that
CheckpointLoaderSimple and A1111 load."""

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..trainer.config import TrainConfig
from ..trainer.convert.diffusers_folder import single_file_to_diffusers
from ..trainer.files import unused_path
from .bridge import ComfyModelBridge
from .convert_nodes import _comfy_tokenizer
from .dataset_nodes import DatasetType
from .headless import finetuned_models, full_finetune, node_run_table, write_checkpoint
from .memory_fit import fit_session
from .monitor_nodes import MonitorType, build_monitor, split_for
from .options_nodes import OPTIONS_INPUT_HELP, OptionsType
from .paths import checked_name, latent_cache_directory
from .train_nodes import CATEGORY, start_session, train_to_end, training_report

log = logging.getLogger("tunekit")
DEFAULT_LEARNING_RATE = 1e-5  # full fine-tunes move every weight: 10x below a LoRA's usual rate
MEMORY_TOOLTIP = (
    "Trains every weight of the MODEL's UNet on a copy made for this run only, so the MODEL you connect (and "
    "every other node using it) is not changed. Extra memory beside the loaded model: the copy, its gradients and "
    "AdamW's two moment buffers: at least 4x the UNet (fp32: 16 bytes per weight; SD 1.5: ~14 GB, SDXL: ~41 GB), "
    "plus activations and the optimizer's temporaries (a LoRA needs a few percent of that). Needs fp32 or bf16 "
    "weights (ComfyUI on GPU loads fp16 by default: start it with "
    "--fp32-unet or --bf16-unet)."
)
TEXT_ENCODER_TOOLTIP = (
    "Also train every weight of the CLIP's text encoder(s) (SD 1.x: CLIP-L; SDXL: CLIP-L and CLIP-G, each at its own "
    "learning rate), on a copy made for this run: the CLIP you connect is not changed, the CLIP output and the "
    "checkpoint carry the trained encoders. Extra memory: 16 bytes per text-encoder weight (an fp32 copy, its "
    "gradient and AdamW's two moments): CLIP-L ~2 GB, SDXL's CLIP-G ~11 GB more. Captions are then encoded every "
    "step (no text cache): slower."
)


class FineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        defaults = TrainConfig()
        return io.Schema(
            node_id="TuneKitFineTune",
            display_name="Fine-tune",
            category=CATEGORY,
            description="Full fine-tune of the loaded model's UNet, optionally of its text encoder(s) too (DreamBooth, "
                        "style fine-tunes). Returns the trained MODEL (and CLIP) for KSampler and writes a checkpoint "
                        "into models/checkpoints. " + MEMORY_TOOLTIP,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The loaded model to fine-tune (SD 1.x or SDXL). " + MEMORY_TOOLTIP),
                io.Clip.Input("clip", tooltip="Encodes the captions (frozen unless train_text_encoder) and is saved "
                                              "into the checkpoint. It is not modified."),
                io.Vae.Input("vae", tooltip="Encodes the training images once and is saved into the checkpoint."),
                DatasetType.Input("dataset", tooltip="From a TuneKit dataset node, or DreamBooth for prior preservation."),
                io.String.Input("run_name", default="tunekit_finetune",
                                tooltip="Names the checkpoint (models/checkpoints, never overwritten: _2, _3... added) "
                                        "and the folder of resumable states in output/tunekit/."),
                io.Int.Input("steps", default=defaults.steps, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=DEFAULT_LEARNING_RATE, min=1e-8, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate. 1e-6 to 5e-6 for SD 1.5 / SDXL fine-tunes; lower it if "
                                       "the loss jumps or samples degrade."),
                io.Int.Input("batch_size", default=defaults.batch_size, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size (512 for SD 1.x, 1024 for SDXL); buckets keep aspect ratios."),
                io.Int.Input("seed", default=defaults.seed, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds noise, timesteps and image order."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Save a resumable state (the trained copies and optimizer) every N steps; 0: only at "
                                     "the end and on Cancel. Each state is ~3x the trained weights on disk; the last 2 "
                                     "are kept."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the latest saved state of this run_name."),
                io.Boolean.Input("save_diffusers", default=False, optional=True,
                                 tooltip="Also write the checkpoint as a diffusers folder in models/diffusers."),
                io.Boolean.Input("train_text_encoder", default=False, optional=True, tooltip=TEXT_ENCODER_TOOLTIP),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-7, optional=True,
                               tooltip="Learning rate of the text encoder (SDXL: CLIP-L) with train_text_encoder; 0: "
                                       "learning_rate. Often half the UNet's or lower, e.g. 5e-6."),
                io.Float.Input("text_encoder_2_lr", default=0.0, min=0.0, max=1.0, step=1e-7, optional=True,
                               tooltip="SDXL's CLIP-G learning rate with train_text_encoder; 0: text_encoder_lr."),
                OptionsType.Input("options", optional=True,
                                  tooltip=OPTIONS_INPUT_HELP),
                MonitorType.Input("monitor", optional=True,
                                  tooltip="From Sample & Validate Settings: samples and validation loss every N steps, "
                                          "shown on this node and saved in the run folder."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained UNet weights (a clone)."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the saved checkpoint."),
                io.String.Output(display_name="report"),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the trained text encoder(s) (a clone) where "
                                                         "train_text_encoder is on; else the input CLIP."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, run_name, steps, learning_rate, batch_size, resolution, seed,
                save_every, resume, save_diffusers=False, train_text_encoder=False, text_encoder_lr=0.0,
                text_encoder_2_lr=0.0, options=None, monitor=None):
        name = checked_name(run_name, "run_name")
        config = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, resolution=resolution,
                             seed=seed, save_every=save_every, text_encoders="all" if train_text_encoder else "none",
                             text_encoder_lr=text_encoder_lr, text_encoder_2_lr=text_encoder_2_lr, **(options or {}))
        trained, trained_clip, report, steps_done = _train(model, clip, vae, dataset, config, name, resume, monitor,
                                                           cls.hidden.unique_id)
        path = _save_checkpoint(trained, trained_clip, vae, name, config, steps_done)
        report += f"\nCheckpoint: {path}"
        if save_diffusers:
            folder = unused_path(Path(folder_paths.get_folder_paths("diffusers")[0]) / name)
            prediction = ComfyModelBridge(model, clip, vae).prediction_type
            single_file_to_diffusers(path, folder, prediction, _comfy_tokenizer())
            report += f"\nDiffusers folder: {folder}"
        log.info("TuneKit: %s", report)
        return io.NodeOutput(trained, str(path), report, trained_clip, ui=ui.PreviewText(report))


def _train(model, clip, vae, dataset, config, run_name, resume, monitor, node_id):
    """Train; returns the trained (MODEL, CLIP), the report and the steps done. Only the trained weights outlive
    this function (the optimizer state and gradients are freed)."""
    dataset, held_out = split_for(monitor, dataset)
    bridge = ComfyModelBridge(model, clip, vae)
    # Copy the weights this MODEL and CLIP sample with (their own patches applied, e.g. LoRAs from LoraLoader),
    # not whatever clone was loaded last.
    trainable = full_finetune(model, bridge, config)
    session, host = start_session(bridge, dataset, config, run_name, resume, node_id, trainable)
    # Before any work: the run fits the device's free memory, or auto changes settings, or it stops here.
    session, memory_report = fit_session(session, lambda fitted: start_session(
        bridge, dataset, fitted, run_name, resume, node_id, trainable)[0])
    session.run_toml = node_run_table(session, model, clip, run_name, method="finetune",
                                      validation=monitor and (monitor.settings, held_out))
    watcher = build_monitor(monitor, session, held_out, vae, latent_cache_directory()) if monitor else None
    if watcher:
        session.step_hooks.append(watcher)
    result, unsaved = train_to_end(session, host, run_name)
    report = training_report(session, result.losses) + (f"; {watcher.summary()}" if watcher else "") \
        + (f" {memory_report}" if memory_report else "") + (f" {unsaved}" if unsaved else "")
    with session.weights_to_save():  # EMA averages or the lowest validation round, where those are what is saved
        trained = finetuned_models(model, clip, trainable)
    return *trained, report, session.result_step


def _save_checkpoint(model, clip, vae, run_name: str, config: TrainConfig, steps_done: int) -> Path:
    directory = Path(folder_paths.get_folder_paths("checkpoints")[0])
    return write_checkpoint(unused_path(directory / f"{run_name}.safetensors"), model, clip, vae, config, steps_done)


FINETUNE_NODES = [FineTune]
