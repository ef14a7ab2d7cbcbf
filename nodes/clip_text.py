"""The trainer's view of ComfyUI's CLIP: its encoders' modules, token vectors, and a tokenizer that reads
`embedding:<name>` from trained vectors instead of a file.

ComfyUI's tokenizer turns `embedding:name` into the embedding file's vectors in place of token ids, and
its text encoder (`SDClipModel.process_tokens`) concatenates them with the token embeddings: vectors that
carry gradients flow through unchanged, so textual inversion trains through ComfyUI's own encode path.
"""

import copy
import re

import torch
from comfy.sd1_clip import SDTokenizer

# ComfyUI keeps each encoder's transformers model under '<encoder>.transformer.' of the CLIP's cond_stage_model.
_ENCODER_PATH = re.compile(r"^(?P<encoder>[^.]+)\.transformer\.(?P<path>text_model\..+|text_projection)$")


def text_encoder_modules(cond_stage_model) -> dict[str, dict[str, torch.nn.Module]]:
    """'clip_l' -> {'text_model.encoder.layers.0.mlp.fc1': module, ..., 'text_projection': module}, in the
    model's order."""
    encoders: dict[str, dict[str, torch.nn.Module]] = {}
    for name, module in cond_stage_model.named_modules():
        if match := _ENCODER_PATH.match(name):
            encoders.setdefault(match["encoder"], {})[match["path"]] = module
    return encoders


def clip_weight_key(encoder: str, path: str) -> str:
    """The cond_stage_model key of an encoder's weight by transformers path (text_encoder_modules' inverse)."""
    return f"{encoder}.transformer.{path}"


def sub_tokenizers(tokenizer) -> dict[str, SDTokenizer]:
    """The per-encoder tokenizers of a CLIP's tokenizer by attribute ('clip_l', 'clip_g')."""
    return {name: value for name, value in vars(tokenizer).items() if isinstance(value, SDTokenizer)}


def token_vectors(clip, text: str) -> dict[str, torch.Tensor]:
    """The input embeddings of `text`'s tokens per encoder, keyed by the tokenizer's embedding key."""
    clip.load_model()
    vectors = {}
    for name, tokenizer in sub_tokenizers(clip.tokenizer).items():
        ids = [token for batch in tokenizer.tokenize_with_weights(text, return_word_ids=True)
               for token, _, word in batch if word and isinstance(token, int)]
        if not ids:
            raise ValueError(f"'{text}' has no tokens: give a word to start the embedding from, e.g. 'person'.")
        weight = getattr(clip.cond_stage_model, name).transformer.get_input_embeddings().weight
        with torch.inference_mode(False):
            vectors[tokenizer.embedding_key] = weight[ids].detach().float().cpu().clone()
    return vectors


def embedding_tokenizer(tokenizer, embeddings: dict[str, dict[str, torch.Tensor]]):
    """A copy of a CLIP's tokenizer whose `embedding:<name>` for a name in `embeddings` gives those vectors
    (per encoder key); other names still load from ComfyUI's embeddings folder."""
    tokenizer = copy.copy(tokenizer)
    for name, sub in sub_tokenizers(tokenizer).items():
        sub = copy.copy(sub)
        if sub.embedding_directory is None:
            sub.embedding_directory = []
        sub._try_get_embedding = _lookup(sub, embeddings)
        setattr(tokenizer, name, sub)
    return tokenizer


def _lookup(tokenizer: SDTokenizer, embeddings: dict[str, dict[str, torch.Tensor]]):
    from_file = tokenizer._try_get_embedding
    parse_only = copy.copy(tokenizer)
    parse_only.embedding_directory = []  # the host's own name parsing, without touching the embeddings folder

    def try_get_embedding(text: str):
        """ComfyUI's `SDTokenizer._try_get_embedding` with the trained vectors in place of a file's. Its result
        differs by host (0.30.0: (vectors, name, leftover), cut at '<' or '['; 0.3.75: (vectors, leftover)),
        so the host parses and only the vectors are swapped in."""
        parsed = parse_only._try_get_embedding(text)
        name = parsed[1] if len(parsed) == 3 else (text.split() or [""])[0]
        vectors = embeddings.get(name.strip(","))
        if vectors is None:
            return from_file(text)
        return (vectors[tokenizer.embedding_key], *parsed[1:])

    return try_get_embedding


def tokenize(clip, tokenizer, text: str):
    """`clip.tokenize(text)` through another tokenizer, with the CLIP's tokenizer options."""
    options = getattr(clip, "tokenizer_options", None) or {}
    return tokenizer.tokenize_with_weights(text, False, **({"tokenizer_options": options} if options else {}))


def clip_with_embeddings(clip, embeddings: dict[str, dict[str, torch.Tensor]]):
    """A clone of `clip` whose prompts read `embedding:<name>` from these (trained) vectors."""
    clone = clip.clone()
    frozen = {name: {key: value.detach().clone() for key, value in vectors.items()} for name, vectors in embeddings.items()}
    clone.tokenizer = embedding_tokenizer(clip.tokenizer, frozen)
    return clone


_RESIDUAL_NORM = re.compile(r"\.encoder\.layers\.\d+\.layer_norm[12]$")


def clone_norm_inputs(cond_stage_model) -> list:
    """ComfyUI's CLIP layers add their residuals in place (`x += self.self_attn(self.layer_norm1(x))`),
    which changes the tensor the layer norm saved for backward. Handing each of those layer norms a copy
    of its input (one [tokens, dim] copy per norm) keeps autograd's saved tensor intact. Returns the
    hooks, to remove when training ends."""
    return [module.register_forward_pre_hook(_copy_input)
            for name, module in cond_stage_model.named_modules() if _RESIDUAL_NORM.search(name)]


def _copy_input(module, args):
    return (args[0].clone(), *args[1:])
