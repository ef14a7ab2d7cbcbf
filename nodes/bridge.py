"""ComfyModelBridge: the trainer's view of the MODEL, CLIP and VAE a ComfyUI graph has loaded.

Nothing here copies base weights or mutates the host's MODEL: training runs on a clone whose
injection (ComfyUI's per-clone seam) attaches the adapters while that clone is loaded.
"""

import copy
import hashlib
import logging
from contextlib import contextmanager
from typing import Sequence

import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_sampling
from comfy.cli_args import args as comfy_args
from comfy.patcher_extension import PatcherInjection

from ..trainer.conv_matmul import matmul_convolutions
from ..trainer.embeddings import mark_embeddings
from ..trainer.families import get_family
from ..trainer.frozen import FrozenBase
from ..trainer.grad_checkpoint import checkpointed
from ..trainer.host import PromptEmbedding, SizeInfo
from .clip_text import clone_norm_inputs, embedding_tokenizer, text_encoder_modules, token_vectors, tokenize
from .conditioning import stack_contexts

log = logging.getLogger(__name__)
INJECTION_KEY = "tunekit.training"
# ComfyUI's model config class -> TuneKit family name.
COMFY_FAMILIES = {"SD15": "sd1", "SDXL": "sdxl"}


def detect_family(patcher):
    config_name = type(patcher.model.model_config).__name__
    return get_family(COMFY_FAMILIES.get(config_name, config_name))


def prediction_type(patcher) -> str:
    sampling = patcher.model.model_sampling
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "epsilon"
    raise ValueError(f"TuneKit trains epsilon and v-prediction models; this one uses {type(sampling).__name__}.")


def training_attention() -> dict:
    """transformer_options for the training forward. Where ComfyUI fell back to its sub-quadratic attention
    only because no flag chose one (its CPU default), torch's scaled_dot_product_attention trains faster
    and keeps less for backward: SD1.5, 256 px, every layer, 1 CPU thread: -9% CPU time per step with the
    fused branches, -0.35 GB peak RSS (benchmarks/train_step.py --comfy-attention pytorch). A choice the
    user made (--use-quad/split-cross-attention, xformers, sage, ...) is kept."""
    attention = comfy.ldm.modules.attention
    if attention.optimized_attention is not attention.attention_sub_quad or comfy_args.use_quad_cross_attention \
            or comfy_args.use_split_cross_attention:
        return {}
    return {"optimized_attention_override": _sdpa_attention}


def _sdpa_attention(default, *args, **kwargs):
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


class ComfyModelBridge:
    def __init__(self, model, clip, vae):
        self.patcher, self.clip, self.vae = model, clip, vae
        self.family = detect_family(model)
        self.prediction_type = prediction_type(model)
        self.device = model.load_device
        base = model.model
        self._dtype = base.manual_cast_dtype or base.get_dtype()
        self._training_clip = None  # the CLIP clone the text encoders train on, inside training(text=True)
        self._training_model = None  # the loaded MODEL clone that trains, inside training()
        # with trained embeddings once use_embeddings() is called; None: a bridge for the denoiser alone
        self._tokenizer = clip.tokenizer if clip is not None else None
        self._embedding_names: list[str] = []

    @property
    def _base(self):
        return self.patcher.model

    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = self._base.model_sampling.sigmas.float()
        return 1 / (sigmas**2 + 1)

    def denoiser_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self._base.diffusion_model.named_modules())

    def unet_levels(self) -> list[int]:
        config = self._base.model_config.unet_config
        blocks = config["num_res_blocks"]
        return list(blocks) if isinstance(blocks, (list, tuple)) else [blocks] * len(config["channel_mult"])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._base.process_latent_in(self.vae.encode(pixels[..., :3]))

    def vae_identity(self) -> str:
        """The VAE's weights (hashed once per loaded VAE), its dtype and the model's latent scale."""
        weights = getattr(self.vae, "_tunekit_identity", None)
        if weights is None:
            digest = hashlib.blake2b(digest_size=16)
            for name, tensor in sorted(self.vae.first_stage_model.state_dict().items()):
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
            weights = digest.hexdigest()
            self.vae._tunekit_identity = weights
        latent = self._base.latent_format
        scale = f"{type(latent).__name__}:{latent.scale_factor}:{getattr(latent, 'shift_factor', None)}"
        return f"vae {weights} {getattr(self.vae, 'vae_dtype', '')} {scale}"

    def encode_prompts(self, captions: Sequence[str]) -> list[PromptEmbedding]:
        clip = self._training_clip or self.clip
        # Cached embeddings wait on the CPU; ones that train stay where their graph is.
        place = (lambda tensor: tensor) if self._training_clip else (lambda tensor: tensor.cpu())
        embeddings = []
        for caption in captions:
            caption = mark_embeddings(caption, self._embedding_names)
            context, pooled = clip.encode_from_tokens(tokenize(clip, self._tokenizer, caption), return_pooled=True)
            keep_pooled = self.family.size_conditioning and pooled is not None
            embeddings.append(PromptEmbedding(place(context[0]), place(pooled[0]) if keep_pooled else None))
        return embeddings

    def text_encoder_modules(self) -> dict[str, dict[str, torch.nn.Module]]:
        return text_encoder_modules(self.clip.cond_stage_model)

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        return token_vectors(self.clip, text)

    def use_embeddings(self, embeddings: dict[str, dict[str, torch.Tensor]]) -> None:
        self._tokenizer = embedding_tokenizer(self.clip.tokenizer, embeddings)
        self._embedding_names = list(embeddings)

    def predict(self, noisy_latents, timesteps, prompts: Sequence[PromptEmbedding], sizes: Sequence[SizeInfo]):
        device, dtype = noisy_latents.device, self._dtype
        context = stack_contexts([prompt.context for prompt in prompts]).to(device, dtype)
        extra = {}
        if self.family.size_conditioning:
            extra["y"] = torch.cat([self._size_embedding(p, s) for p, s in zip(prompts, sizes)]).to(device, dtype)
        output = self._base.diffusion_model(
            noisy_latents.to(dtype), timesteps.float(), context=context, transformer_options=training_attention(), **extra
        )
        return output.float()

    def _size_embedding(self, prompt: PromptEmbedding, size: SizeInfo) -> torch.Tensor:
        (height, width), (top, left), (target_h, target_w) = size.original, size.crop_top_left, size.target
        return self._base.encode_adm(
            pooled_output=prompt.pooled[None].to(self.device),
            width=width, height=height, crop_w=left, crop_h=top, target_width=target_w, target_height=target_h,
        )

    def sampling_models(self):
        """(MODEL, CLIP) as trained so far: inside training() the loaded training clones, whose adapters
        run as side branches (ComfyUI's samplers use them as they are), else the graph's own. With trained
        embeddings the CLIP's prompts read `embedding:<name>` from the vectors as they are now."""
        model, clip = self._training_model or self.patcher, self._training_clip or self.clip
        if self._embedding_names:
            clip = copy.copy(clip)  # the same loaded patcher (a clone would load, and inject, again)
            clip.tokenizer = self._tokenizer
        return model, clip

    def set_clip_skip(self, layers: int) -> None:
        """Encode captions from the `layers`-th last CLIP layer (CLIPSetLastLayer -layers) with a clone: the
        graph's CLIP keeps its own setting."""
        if layers > 1:
            self.clip = self.clip.clone()
            self.clip.clip_layer(-layers)

    @contextmanager
    def training(self, attach, detach, text: bool = False, gradient_checkpointing: bool = False):
        # With the text side training, each clone attaches only its own branches (by kohya prefix).
        unet = ("lora_unet",) if text else ()
        clones = [_inject_training(self.patcher.clone(), lambda p: p.model.diffusion_model, unet, attach, detach)]
        if text:  # the text encoders run with grad: a CLIP clone with its own injection, the graph's CLIP untouched
            self._training_clip = self.clip.clone()
            clones.append(_inject_training(self._training_clip.patcher, lambda p: p.model, ("lora_te",), attach, detach,
                                           clone_norm_inputs))
        comfy.model_management.load_models_gpu(clones, force_full_load=True)
        self._training_model = clones[0]
        try:
            unet = clones[0].model.diffusion_model
            blocks = _unet_blocks(unet) if gradient_checkpointing else []
            if blocks:
                log.info("TuneKit: gradient checkpointing on %d UNet blocks", len(blocks))
            with checkpointed(blocks), matmul_convolutions(unet):
                yield
        finally:
            self._training_clip = self._training_model = None
            for patcher in reversed(clones):
                patcher.eject_model()


def _unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's blocks, each checkpointed as a whole (diffusers' granularity): activations inside a
    block are recomputed in backward instead of kept."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def _inject_training(clone, trained_root, prefix: tuple, attach, detach, add_hooks=None):
    """Give a patcher clone an injection that swaps the trained module tree's weights for frozen aliases
    and attaches the branches (those named `prefix...` where given) while the clone is loaded; eject
    restores both. `add_hooks(root)` returns further hooks that live as long as the injection."""
    frozen = FrozenBase()
    hooks = []

    def inject(loaded):
        frozen.apply(trained_root(loaded))
        hooks.extend(add_hooks(trained_root(loaded)) if add_hooks else ())
        attach(*prefix)

    def eject(loaded):
        detach(*prefix)
        while hooks:
            hooks.pop().remove()
        frozen.restore()

    clone.set_injections(INJECTION_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return clone
