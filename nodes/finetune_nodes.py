"""Fine-tune: a full fine-tune of the loaded MODEL's denoiser through the same TrainSession as Train LoRA,
saved as a single-file checkpoint (models/checkpoints) that CheckpointLoaderSimple and A1111 load."""

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
from .headless import full_finetune, node_run_table, with_weights, write_checkpoint
from .paths import checked_name
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


class FineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        defaults = TrainConfig()
        return io.Schema(
            node_id="TuneKitFineTune",
            display_name="Fine-tune",
            category=CATEGORY,
            description="Full fine-tune of the loaded model's UNet (DreamBooth, style fine-tunes). Returns the trained "
                        "MODEL for KSampler and writes a checkpoint into models/checkpoints. " + MEMORY_TOOLTIP,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The loaded model to fine-tune (SD 1.x or SDXL). " + MEMORY_TOOLTIP),
                io.Clip.Input("clip", tooltip="Encodes the captions (kept frozen) and is saved into the checkpoint."),
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
                             tooltip="Save a resumable state (the full UNet copy and optimizer) every N steps; 0: only "
                                     "at the end and on Cancel. Each state is ~3x the UNet on disk; the last 2 are kept."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the latest saved state of this run_name."),
                io.Boolean.Input("save_diffusers", default=False, optional=True,
                                 tooltip="Also write the checkpoint as a diffusers folder in models/diffusers."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained UNet weights (a clone)."),
                io.String.Output(display_name="checkpoint", tooltip="Path of the saved checkpoint."),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, run_name, steps, learning_rate, batch_size, resolution, seed,
                save_every, resume, save_diffusers=False):
        name = checked_name(run_name, "run_name")
        config = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, resolution=resolution,
                             seed=seed, save_every=save_every)
        weights, report, steps_done = _train(model, clip, vae, dataset, config, name, resume, cls.hidden.unique_id)
        trained = with_weights(model, weights)
        path = _save_checkpoint(trained, clip, vae, name, config, steps_done)
        report += f"\nCheckpoint: {path}"
        if save_diffusers:
            folder = unused_path(Path(folder_paths.get_folder_paths("diffusers")[0]) / name)
            prediction = ComfyModelBridge(model, clip, vae).prediction_type
            single_file_to_diffusers(path, folder, prediction, _comfy_tokenizer())
            report += f"\nDiffusers folder: {folder}"
        log.info("TuneKit: %s", report)
        return io.NodeOutput(trained, str(path), report, ui=ui.PreviewText(report))


def _train(model, clip, vae, dataset, config, run_name, resume, node_id):
    """Train; only the trained weights outlive this function (the optimizer state and gradients are freed)."""
    bridge = ComfyModelBridge(model, clip, vae)
    # Copy the weights this MODEL samples with (its own patches applied, e.g. LoRAs from LoraLoader), not
    # whatever clone was loaded last.
    trainable = full_finetune(model, bridge)
    session, host = start_session(bridge, dataset, config, run_name, resume, node_id, trainable)
    session.run_toml = node_run_table(session, model, clip, run_name, method="finetune")
    result = train_to_end(session, host, run_name)
    return trainable.trained_weights(device=model.offload_device), training_report(session, result.losses), session.step


def _save_checkpoint(model, clip, vae, run_name: str, config: TrainConfig, steps_done: int) -> Path:
    directory = Path(folder_paths.get_folder_paths("checkpoints")[0])
    return write_checkpoint(unused_path(directory / f"{run_name}.safetensors"), model, clip, vae, config, steps_done)


FINETUNE_NODES = [FineTune]
