"""Train Embedding: textual inversion on the graph's MODEL/CLIP/VAE, saved where `embedding:<name>` finds it;
with lora_rank > 0 pivotal tuning (a UNet LoRA trained together with the embedding, saved to models/loras)."""

import logging
from pathlib import Path

import comfy.sd
import folder_paths
from comfy_api.latest import io, ui

from ..trainer.adapters import TARGET_PRESETS
from ..trainer.config import TrainConfig
from ..trainer.embeddings import (
    MAX_VECTORS,
    TokenEmbedding,
    embedding_problems,
    save_pivotal_lora,
    save_trained_embedding,
)
from ..trainer.errors import ConfigError
from .bridge import ComfyModelBridge
from .clip_text import clip_with_embeddings
from .dataset_nodes import DatasetType
from .headless import node_run_table
from .memory_fit import fit_session
from .monitor_nodes import MonitorType, build_monitor, split_for
from .network_nodes import NetworkType
from .options_nodes import OPTIONS_INPUT_HELP, OptionsType
from .paths import latent_cache_directory, loras_directory
from .train_nodes import CATEGORY, start_session, train_to_end, training_report

log = logging.getLogger("tunekit")
DEFAULT_LORA_LEARNING_RATE = 1e-4


def embeddings_directory() -> Path:
    """ComfyUI's first embeddings folder: where `embedding:<name>` in a prompt looks."""
    return Path(folder_paths.get_folder_paths("embeddings")[0])


class TrainEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitTrainEmbedding",
            display_name="Train Embedding (Textual Inversion)",
            category=CATEGORY,
            description=(
                "Learns a new word for your images: token vectors trained while the model and text encoder stay frozen "
                "(textual inversion). Saved into models/embeddings, so any prompt can use it as embedding:<name> "
                "(A1111 reads the same file). Captions name it where it belongs ('a photo of <name>'); a caption "
                "without it gets it in front. With lora_rank above 0 a LoRA on the UNet trains together with it "
                "(pivotal tuning), saved into models/loras under the embedding's name."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The loaded model (SD 1.x or SDXL); frozen, not modified."),
                io.Clip.Input("clip", tooltip="Its text encoder(s): the embedding is learnt through them (frozen)."),
                io.Vae.Input("vae", tooltip="The model's VAE, used once to encode the training images."),
                DatasetType.Input("dataset", tooltip="From a TuneKit dataset node."),
                io.String.Input("name", default="tk_embedding",
                                tooltip="The new word and file name: prompts write embedding:<name>. An existing file is "
                                        "kept and a _2, _3... suffix added (the 'name' output says which)."),
                io.String.Input("init_word", default="person",
                                tooltip="The vectors start from this word's token embeddings: a word close to the "
                                        "subject ('cat', 'painting') trains faster."),
                io.Int.Input("num_vectors", default=1, min=1, max=MAX_VECTORS,
                             tooltip="Vectors (tokens) the word takes in a prompt: 1-8 is typical; more learn more "
                                     "detail and use more of the 75-token prompt."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-7, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate of the vectors; 5e-3 is a common start."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size (512 for SD 1.x, 1024 for SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Seeds noise, timesteps and image order (and the LoRA's initialisation)."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Save a resumable state every N steps (0: only at the end and on Cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the latest saved state of this name's run (output/tunekit/<name>)."),
                io.Int.Input("lora_rank", default=0, min=0, max=256, optional=True,
                             tooltip="Pivotal tuning: also train a LoRA of this rank on the UNet, together with the "
                                     "embedding, so the model learns what the word alone cannot (0: the embedding "
                                     "only). The MODEL output carries it; it is saved into models/loras under the "
                                     "embedding's name: load it with LoraLoader and prompt embedding:<name>. 4-16 is "
                                     "typical; costs what Train LoRA costs."),
                io.Float.Input("lora_alpha", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="Scales the LoRA by alpha / rank; 0: the rank (scale 1)."),
                io.Float.Input("lora_learning_rate", default=DEFAULT_LORA_LEARNING_RATE, min=1e-7, max=1.0, step=1e-5,
                               optional=True,
                               tooltip="The LoRA's learning rate (its own optimizer group; learning_rate stays the "
                                       "embedding's). 1e-4 is a safe start."),
                io.Combo.Input("lora_targets", options=list(TARGET_PRESETS), default=TrainConfig().targets, optional=True,
                               tooltip="The LoRA's layers, as Train LoRA's targets: 'transformer' (kohya's default), "
                                       "'attention' (q/k/v/out only), 'all' (every linear and conv layer)."),
                NetworkType.Input("network_settings", optional=True,
                                  tooltip="From LoRA Network Settings, for the pivotal LoRA: conv rank/alpha, a custom "
                                          "target pattern, or a LoRA file to continue. Needs lora_rank above 0."),
                OptionsType.Input("options", optional=True,
                                  tooltip=OPTIONS_INPUT_HELP + " Its unet_lr is lora_learning_rate here."),
                MonitorType.Input("monitor", optional=True,
                                  tooltip="From Sample & Validate Settings: samples and validation loss every N steps, "
                                          "shown on this node and saved in the run folder. Write embedding:<name> in its "
                                          "prompts: they read the vectors as trained so far."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The input CLIP whose prompts read embedding:<name> (and the "
                                                         "saved name) from the trained vectors, equal to the saved file."),
                io.String.Output(display_name="name", tooltip="The saved embedding's name: write embedding:<name>."),
                io.String.Output(display_name="report"),
                io.Model.Output(display_name="MODEL", tooltip="With lora_rank above 0: the input model with the trained "
                                                           "LoRA applied, as LoraLoader applies the saved file; else "
                                                           "the input model."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, init_word, num_vectors, steps, learning_rate, batch_size,
                resolution, seed, save_every, resume, lora_rank=0, lora_alpha=0.0,
                lora_learning_rate=DEFAULT_LORA_LEARNING_RATE, lora_targets="transformer", network_settings=None,
                options=None, monitor=None):
        name = name.strip()
        settings = {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "resolution": resolution,
                    "seed": seed, "save_every": save_every, "init_word": init_word.strip(), "num_vectors": num_vectors}
        config = embedding_config(name, settings, pivotal_settings(lora_rank, lora_alpha, lora_learning_rate, lora_targets),
                                  network_settings, options)
        dataset, held_out = split_for(monitor, dataset)
        bridge, node_id = ComfyModelBridge(model, clip, vae), cls.hidden.unique_id
        embedding = TokenEmbedding.from_init_word(bridge, name, config.init_word, config.num_vectors)

        def start(settings: TrainConfig):
            return start_session(bridge, dataset, settings, name, resume, node_id, trainable=embedding)

        session, host = start(config)
        # Before any work: the run fits the device's free memory, or auto changes settings, or it stops here.
        session, memory_report = fit_session(session, lambda fitted: start(fitted)[0])
        session.run_toml = node_run_table(session, model, clip, name, method="embedding",
                                          validation=monitor and (monitor.settings, held_out))  # `tunekit train` re-runs it
        watcher = build_monitor(monitor, session, held_out, vae, latent_cache_directory()) if monitor else None
        if watcher:
            session.step_hooks.append(watcher)
        result, unsaved = train_to_end(session, host, name)
        trained_model, trained_clip, saved, saved_report = save_outputs(session, embedding, model, clip, name)
        report = " ".join(filter(None, [f"{training_report(session, result.losses)}.", saved_report,
                                        watcher.summary() if watcher else "", memory_report, unsaved]))
        log.info("TuneKit: %s", report)
        return io.NodeOutput(trained_clip, saved, report, trained_model, ui=ui.PreviewText(report))


def pivotal_settings(rank: int, alpha: float, learning_rate: float, targets: str) -> dict:
    """The TrainConfig fields of pivotal tuning's LoRA; none with rank 0 (the embedding alone)."""
    if not rank:
        return {}
    return {"pivotal": True, "rank": rank, "alpha": alpha or float(rank), "unet_lr": learning_rate, "targets": targets}


def embedding_config(name: str, settings: dict, pivotal: dict, network_settings: dict | None,
                     options: dict | None) -> TrainConfig:
    """The run's settings, checked as a whole: every problem at once, each naming its input."""
    options = dict(options or {})
    found = []
    if network_settings and not pivotal:
        found.append("network_settings is connected but lora_rank is 0, so no LoRA trains: set lora_rank (e.g. 4) for "
                     "pivotal tuning, or disconnect network_settings.")
    if unet_lr := options.pop("unet_lr", 0.0):
        found.append(f"unet_lr (Training Options) is {unet_lr}: Train Embedding's LoRA learns at lora_learning_rate; "
                     f"set unet_lr to 0 and lora_learning_rate to the rate you want.")
    config = TrainConfig(**settings, **pivotal, **((network_settings or {}) if pivotal else {}), **options)
    found += [*config.problems(), *embedding_problems(name, config.init_word, config.num_vectors)]
    if found:
        raise ConfigError(found)
    return config


def save_outputs(session, embedding: TokenEmbedding, model, clip, name: str):
    """The embedding in models/embeddings and, with pivotal tuning, its LoRA in models/loras under the same
    name. Returns (MODEL with the LoRA, CLIP reading the embedding, the saved name, a line for the report)."""
    path, vectors = save_trained_embedding(session, embedding, embeddings_directory() / f"{name}.safetensors")
    # In this graph both the trained name and the saved one (suffixed where the name was taken) mean the
    # new vectors; later prompts load the file by its name.
    trained_clip = clip_with_embeddings(clip, {name: vectors, path.stem: vectors})
    saved = f"Saved {path.name}: use embedding:{path.stem} in a prompt."
    if not session.config.pivotal:
        return model, trained_clip, path.stem, saved
    lora_path, tensors, _ = save_pivotal_lora(session, path, loras_directory() / f"{path.stem}.safetensors")
    # LoraLoader's own path on the saved tensors: the MODEL output samples as the file does.
    trained_model = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)[0]
    return trained_model, trained_clip, path.stem, f"{saved} Its LoRA: {lora_path.name} in models/loras."


EMBEDDING_NODES = [TrainEmbedding]
