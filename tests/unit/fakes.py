"""A tiny ldm-shaped denoiser and a bridge over it: the core's tests need no host.

The denoiser keeps ComfyUI's module names (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`)
and is built under `torch.inference_mode()`, as ComfyUI loads its weights.
"""

from contextlib import contextmanager

import torch
from torch import nn
from tunekit.trainer.embeddings import mark_embeddings
from tunekit.trainer.events import StepDone
from tunekit.trainer.families import SD1
from tunekit.trainer.frozen import FrozenBase
from tunekit.trainer.grad_checkpoint import checkpointed
from tunekit.trainer.host import PromptEmbedding

CONTEXT_DIM = 8
CHANNELS = 16


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out[0](weights @ v)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(dim * 2, dim)])
        self.net[0].proj = nn.Linear(dim, dim * 2)

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0].proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, CONTEXT_DIM)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class TinyDenoiser(nn.Module):
    """One level, one res block: input_blocks.1.1, middle_block.1 and output_blocks.{0,1}.1 attend."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(1, CHANNELS), nn.SiLU())
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4, CHANNELS, 3, padding=1)]),
            nn.ModuleList([nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), SpatialTransformer(CHANNELS)]),
        ])
        self.middle_block = nn.ModuleList([nn.Identity(), SpatialTransformer(CHANNELS), nn.Identity()])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), SpatialTransformer(CHANNELS)]),
            nn.ModuleList([nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), SpatialTransformer(CHANNELS)]),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, CHANNELS), nn.SiLU(), nn.Conv2d(CHANNELS, 4, 3, padding=1))

    def forward(self, x, timesteps, context):
        # Like ComfyUI's UNet: the timestep embedding is computed in float, then run in the weights' dtype.
        h = self.input_blocks[0][0](x) + self.time_embed((timesteps[:, None].float() / 1000).to(x.dtype))[:, :, None, None]
        h = self.input_blocks[1][1](self.input_blocks[1][0](h), context)
        h = self.middle_block[1](h, context)
        for conv, attention in self.output_blocks:
            h = attention(conv(h), context)
        return self.out(h)


class FakeBridge:
    """The ModelBridge protocol over TinyDenoiser; images are 'encoded' by 8x average pooling."""

    family = SD1
    device = torch.device("cpu")
    prediction_type = "epsilon"

    def __init__(self, seed: int = 0):
        with torch.inference_mode():
            torch.manual_seed(seed)
            self.denoiser = TinyDenoiser()
            self.text_table = torch.randn(64, CONTEXT_DIM)
        self.encoded_images = 0
        self.vae_name = "fake-vae-avgpool8"  # change it to stand for another VAE
        self.clip_skip = 1
        self.checkpointed_forwards = 0  # checkpointed blocks' inner forwards: forward pass and recomputation

    def alphas_cumprod(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        return torch.cumprod(1 - betas, 0)

    def denoiser_modules(self):
        return dict(self.denoiser.named_modules())

    def unet_levels(self):
        return [1]

    def encode_images(self, pixels):
        self.encoded_images += pixels.shape[0]
        image = pixels.movedim(-1, 1)
        latent = nn.functional.avg_pool2d(image, 8)
        return torch.cat([latent, latent.mean(1, keepdim=True)], 1) * 2 - 1

    def vae_identity(self):
        return self.vae_name

    def set_clip_skip(self, layers: int):
        self.clip_skip = layers

    def encode_prompts(self, captions):
        # An earlier "layer" (clip skip) reads other rows of the table: other embeddings for the same words.
        shift = self.clip_skip - 1
        return [PromptEmbedding(self.text_table[[(sum(map(ord, word)) + shift) % 64 for word in c.split()] or [0]])
                for c in captions]

    def predict(self, noisy, timesteps, prompts, sizes):
        tokens = max(p.context.shape[0] for p in prompts)
        context = torch.stack([p.context.repeat(tokens, 1)[:tokens] for p in prompts])
        return self.denoiser(noisy, timesteps, context)

    @contextmanager
    def training(self, attach, detach, gradient_checkpointing: bool = False):
        frozen = FrozenBase()
        frozen.apply(self.denoiser)
        attach()
        blocks = [m for m in self.denoiser.modules() if isinstance(m, SpatialTransformer)] if gradient_checkpointing else []
        for block in blocks:  # counted inside the block: its recomputation in backward calls proj_in again
            block.proj_in.register_forward_pre_hook(self._count_checkpointed)
        try:
            with checkpointed(blocks):
                yield
        finally:
            for block in blocks:
                block.proj_in._forward_pre_hooks.clear()
            detach()
            frozen.restore()

    def _count_checkpointed(self, module, args):
        self.checkpointed_forwards += 1


class TinyCLIPLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(dim, dim))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, dim * 2), nn.Linear(dim * 2, dim)

    def forward(self, x):
        attn = self.self_attn
        weights = torch.softmax(attn.q_proj(x) @ attn.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        x = x + attn.out_proj(weights @ attn.v_proj(x))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(x)))


class TinyTextEncoder(nn.Module):
    """CLIP-shaped module names (`text_model.encoder.layers.0.self_attn.q_proj`), one layer, 64 tokens."""

    def __init__(self):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(64, CONTEXT_DIM)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([TinyCLIPLayer(CONTEXT_DIM)])

    def forward(self, vectors):
        for layer in self.text_model.encoder.layers:
            vectors = layer(vectors)
        return vectors


def token_id(word: str) -> int:
    return sum(map(ord, word)) % 64


class FakeTextBridge(FakeBridge):
    """FakeBridge whose captions go through a tiny CLIP-shaped encoder ('clip_l'); `embedding:<name>` in a
    caption reads the vectors given to use_embeddings()."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        with torch.inference_mode():
            torch.manual_seed(seed + 1)
            self.text_encoder = TinyTextEncoder()
        self.embeddings: dict = {}
        self.text_trainings = 0  # training contexts entered with the text side training

    def text_encoder_modules(self):
        return {"clip_l": dict(self.text_encoder.named_modules())}

    def token_vectors(self, text):
        table = self.text_encoder.text_model.embeddings.token_embedding.weight
        with torch.inference_mode(False):
            return {"clip_l": table[[token_id(word) for word in text.split()]].clone()}

    def use_embeddings(self, embeddings):
        self.embeddings = embeddings

    def encode_prompts(self, captions):
        return [PromptEmbedding(self.text_encoder(self._vectors(mark_embeddings(caption, list(self.embeddings)))))
                for caption in captions]

    def _vectors(self, caption):
        table = self.text_encoder.text_model.embeddings.token_embedding.weight
        parts = []
        for word in caption.split() or [""]:
            name = word.removeprefix("embedding:")
            if word.startswith("embedding:") and name in self.embeddings:
                parts.append(self.embeddings[name]["clip_l"])
            else:
                parts.append(table[[token_id(word)]])
        return torch.cat(parts)

    @contextmanager
    def training(self, attach, detach, text: bool = False, **options):
        frozen = FrozenBase()
        if text:
            frozen.apply(self.text_encoder)
            self.text_trainings += 1
        try:
            with super().training(attach, detach, **options):
                yield
        finally:
            frozen.restore()


class RecordingHost:
    """A Host that keeps every event; with `stop_after`, asks to stop once that many steps are done."""

    def __init__(self, stop_after: int | None = None):
        self.events, self.stop_after = [], stop_after

    def emit(self, event):
        self.events.append(event)

    def should_stop(self):
        return self.stop_after is not None and len(self.of(StepDone)) >= self.stop_after

    def of(self, kind):
        return [event for event in self.events if isinstance(event, kind)]
