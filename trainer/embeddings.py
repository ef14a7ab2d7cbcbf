"""Textual inversion: new token vectors learnt while the denoiser and the text encoders stay frozen.

Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion"
(2022). The vectors start from an init word's token embeddings (cycled to the vector count, as kohya's
`train_textual_inversion.py` does) and are trained by the one TrainSession loop as its `trainable`.

Files are what ComfyUI (`embedding:<name>` in a prompt) and A1111 (its `embeddings/` folder) load: one
text encoder (SD1/SD2): `{"emb_params": [vectors, dim]}`; SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
The file's stem is the name a prompt uses.

Pivotal tuning (as in cloneofsimo's lora "pivotal tuning" and diffusers' advanced DreamBooth LoRA script):
the embedding and a LoRA on the UNet train together in the same session, one optimizer with a group per
part (the embedding at `learning_rate`, the LoRA at `unet_lr`); the LoRA is saved as Train LoRA saves one,
with metadata naming the embedding it belongs with.
"""

import json
import re
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .adapters import AdapterNetwork
from .adapters.kohya import save_lora
from .config import TrainConfig
from .errors import ConfigError
from .files import atomic_write, unused_path
from .host import ModelBridge
from .text_encoders import network_param_groups

EMBEDDING_PREFIX = "embedding:"
STATE_PREFIX = "embedding."  # the vectors' keys in a resumable state
SINGLE_ENCODER_KEY = "emb_params"  # A1111's key for a one-encoder embedding
MAX_VECTORS = 75  # one CLIP chunk holds 75 tokens


class TokenEmbedding(nn.Module):
    """The trained vectors of one new word, per text encoder (keyed as embedding files key them).

    The session trains it like an adapter network: it has `attach`/`detach` (nothing to hook: the bridge
    reads the vectors through `use_embeddings`), parameters and state-dict I/O for resumable states."""

    trains_text = True  # the session encodes captions every step, with grad

    def __init__(self, name: str, initial: dict[str, torch.Tensor]):
        super().__init__()
        self.name = name
        self.vectors = nn.ParameterDict({key: nn.Parameter(value.detach().float().clone()) for key, value in initial.items()})

    @classmethod
    def from_init_word(cls, bridge: ModelBridge, name: str, init_word: str, num_vectors: int) -> "TokenEmbedding":
        check_embedding_settings(name, init_word, num_vectors)
        with torch.inference_mode(False):
            initial = {key: cycle_rows(vectors, num_vectors) for key, vectors in bridge.token_vectors(init_word).items()}
            embedding = cls(name, initial).to(bridge.device)
        bridge.use_embeddings({name: dict(embedding.vectors)})
        return embedding

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def attach(self, prefix: str = "") -> None:
        pass

    def detach(self, prefix: str = "") -> None:
        pass

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return [{"params": list(self.vectors.values()), "lr": config.learning_rate, "name": "embedding"}]

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The vectors for a resumable state (every encoder under its own key)."""
        return {f"{STATE_PREFIX}{key}": _export(value, dtype) for key, value in self.vectors.items()}

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = {key.removeprefix(STATE_PREFIX): value for key, value in tensors.items() if key.startswith(STATE_PREFIX)}
        if found := _vector_mismatches(self.vectors, saved):
            raise ConfigError(found)
        with torch.no_grad():
            for key, value in self.vectors.items():
                value.copy_(saved[key])

    def trained_vectors(self) -> dict[str, torch.Tensor]:
        """Detached copies of the vectors, per encoder key (what a CLIP output and the file hold)."""
        return {key: value.detach().clone() for key, value in self.vectors.items()}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The embedding file's tensors (fp32): A1111's `emb_params` for one encoder, else per encoder."""
        if len(self.vectors) == 1:
            return {SINGLE_ENCODER_KEY: _export(next(iter(self.vectors.values())), torch.float32)}
        return {key: _export(value, torch.float32) for key, value in self.vectors.items()}


class PivotalTuning(nn.Module):
    """The embedding and a LoRA network on the UNet, trained as one trainable: the LoRA's branches attach as
    the network's do, the optimizer gets the embedding's group and the network's (each its own rate), and a
    resumable state holds both (the vectors under `embedding.*`, the branches under their kohya names)."""

    trains_text = True

    def __init__(self, embedding: TokenEmbedding, lora: AdapterNetwork):
        super().__init__()
        self.embedding, self.lora = embedding, lora

    def attach(self, prefix: str = "") -> None:
        self.lora.attach(prefix)

    def detach(self, prefix: str = "") -> None:
        self.lora.detach(prefix)

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return [*self.embedding.param_groups(config), *network_param_groups(self.lora, config)]

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {**self.lora.kohya_state_dict(dtype), **self.embedding.kohya_state_dict(dtype)}

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.load_kohya_state_dict({key: value for key, value in tensors.items() if not key.startswith(STATE_PREFIX)})
        self.embedding.load_kohya_state_dict(tensors)


def _vector_mismatches(ours: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    if missing := sorted(set(ours) - set(saved)):
        return [(f"the saved state holds no embedding vectors for {', '.join(missing)}: resume a textual-inversion "
                 f"run of this model, or start a new run (another name).")]
    return [(f"the saved embedding has {saved[key].shape[0]} vectors, this run {value.shape[0]}: set num_vectors to "
             f"{saved[key].shape[0]}, or start a new run (another name).")
            for key, value in ours.items() if saved[key].shape != value.shape][:1]


def embedding_problems(name: str, init_word: str, num_vectors: int) -> list[str]:
    """Every problem of an embedding's settings, each with the value and the fix."""
    found = []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        found.append(f"name is '{name}': use one word of letters, digits, '_', '-' or '.' (a prompt writes "
                     f"embedding:{name or 'name'}), e.g. 'tkcat'.")
    if not init_word.strip():
        found.append("init_word is empty: give a word close to what the embedding should learn, e.g. 'cat'.")
    if not 1 <= num_vectors <= MAX_VECTORS:
        found.append(f"num_vectors is {num_vectors}: use 1 to {MAX_VECTORS} (1-8 is typical; each takes a token of the prompt).")
    return found


def check_embedding_settings(name: str, init_word: str, num_vectors: int) -> None:
    if found := embedding_problems(name, init_word, num_vectors):
        raise ConfigError(found)


def cycle_rows(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows, repeating the init word's token vectors in order."""
    return vectors[torch.arange(count) % vectors.shape[0]]


def mark_embeddings(caption: str, names: list[str]) -> str:
    """The caption as a prompt that uses the embeddings: each whole word `<name>` becomes `embedding:<name>`;
    a caption without it gets `embedding:<name>` in front (as 'a photo of {}' templates would)."""
    for name in names:
        pattern = re.compile(rf"(?<![\w:.-]){re.escape(name)}(?![\w.-])")
        if pattern.search(caption):
            caption = pattern.sub(EMBEDDING_PREFIX + name, caption)
        elif EMBEDDING_PREFIX + name not in caption:
            caption = f"{EMBEDDING_PREFIX}{name}, {caption}" if caption.strip() else EMBEDDING_PREFIX + name
    return caption


def save_embedding(path: Path, embedding: TokenEmbedding, config: TrainConfig, steps_done: int) -> Path:
    """Write atomically; the caller picks an unused path (we never overwrite unasked)."""
    metadata = {
        "tunekit_config": json.dumps(config.to_dict()),
        "tunekit_embedding": json.dumps(_embedding_facts(path.stem, embedding, config, steps_done)),
    }
    tensors = {key: value.contiguous() for key, value in embedding.file_tensors().items()}
    return atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, str(temp), metadata))


def _embedding_facts(file_name: str, embedding: TokenEmbedding, config: TrainConfig, steps_done: int) -> dict:
    return {"name": file_name, "trained_as": embedding.name, "init_word": config.init_word,
            "num_vectors": embedding.num_vectors, "steps": steps_done}


def save_trained_embedding(session, embedding: TokenEmbedding, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The session's embedding as a save writes it (EMA averages where on), at `path` or beside it with a
    suffix; returns (the file, its vectors)."""
    with session.weights_to_save():
        saved = save_embedding(unused_path(path), embedding, session.config, session.result_step)
        return saved, embedding.trained_vectors()


def save_pivotal_lora(session, embedding_file: Path, path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """Pivotal tuning's LoRA as Train LoRA saves one (kohya keys, `ss_*` metadata), at `path` or beside it with
    a suffix; the metadata names the embedding it was trained with (`modelspec.trigger_phrase`)."""
    path = unused_path(path)
    tensors, metadata = session.export(path.stem)
    embedding = session.network.embedding
    metadata = {**metadata, "ss_output_name": path.stem, "modelspec.title": path.stem,
                "modelspec.trigger_phrase": EMBEDDING_PREFIX + embedding_file.stem,
                "ss_tunekit_embedding": json.dumps({**_embedding_facts(embedding_file.stem, embedding, session.config,
                                                                        session.result_step), "file": embedding_file.name})}
    return save_lora(path, tensors, metadata), tensors, metadata


def _export(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    value = value.detach()
    return (value.to(dtype) if dtype is not None else value).cpu().clone()
