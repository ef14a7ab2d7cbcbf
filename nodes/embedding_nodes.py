"""Train Embedding: textual inversion on the graph's MODEL/CLIP/VAE, saved where `embedding:<name>` finds it."""

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..trainer.config import TrainConfig
from ..trainer.embeddings import MAX_VECTORS, TokenEmbedding, save_embedding
from ..trainer.files import unused_path
from .bridge import ComfyModelBridge
from .clip_text import clip_with_embeddings
from .dataset_nodes import DatasetType
from .train_nodes import CATEGORY, start_session, train_to_end, training_report

log = logging.getLogger("tunekit")


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
                "without it gets it in front."
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
                             tooltip="Seeds noise, timesteps and image order."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Save a resumable state every N steps (0: only at the end and on Cancel)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the latest saved state of this name's run (output/tunekit/<name>)."),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The input CLIP whose prompts read embedding:<name> (and the "
                                                         "saved name) from the trained vectors, equal to the saved file."),
                io.String.Output(display_name="name", tooltip="The saved embedding's name: write embedding:<name>."),
                io.String.Output(display_name="report"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, name, init_word, num_vectors, steps, learning_rate, batch_size,
                resolution, seed, save_every, resume):
        name = name.strip()
        config = TrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, resolution=resolution,
                             seed=seed, save_every=save_every)
        config.validate()
        bridge = ComfyModelBridge(model, clip, vae)
        embedding = TokenEmbedding.from_init_word(bridge, name, init_word, num_vectors)
        session, host = start_session(bridge, dataset, config, name, resume, cls.hidden.unique_id, trainable=embedding)
        result = train_to_end(session, host, name)
        path = save_embedding(unused_path(embeddings_directory() / f"{name}.safetensors"), embedding, config,
                              init_word, session.step)
        # In this graph both the trained name and the saved one (suffixed where the name was taken) mean the
        # new vectors; later prompts load the file by its name.
        trained_clip = clip_with_embeddings(clip, {name: dict(embedding.vectors), path.stem: dict(embedding.vectors)})
        report = f"{training_report(session, result.losses)}. Saved {path.name}: use embedding:{path.stem} in a prompt."
        log.info("TuneKit: %s", report)
        return io.NodeOutput(trained_clip, path.stem, report, ui=ui.PreviewText(report))


EMBEDDING_NODES = [TrainEmbedding]
