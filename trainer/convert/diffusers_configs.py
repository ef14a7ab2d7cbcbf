"""diffusers/transformers config files derived from a single file's weights plus the family's fixed
facts, so a folder is written with no download (diffusers' own `from_single_file` fetches them)."""

import re

from .arch import UNET_PREFIX, Arch, TextEncoder
from .errors import ConversionError
from .tensor_files import TensorSpec
from .unet_names import UNetLayout

DIFFUSERS_VERSION = "0.30.0"  # the config format written; newer diffusers read it
SAMPLE_SIZES = {"sd1": 512, "sd2": 512, "sdxl": 1024}
VAE_SCALES = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def diffusers_layers(specs: dict[str, TensorSpec], encoder: TextEncoder, family: str) -> int:
    """How many layers the diffusers text encoder keeps: all, except SD2's last one (SD2 conditions on the
    penultimate OpenCLIP layer, so diffusers' SD2 text encoder stops there; the last goes to the sidecar)."""
    pattern = r"transformer\.resblocks\.(\d+)\." if encoder.openclip else r"text_model\.encoder\.layers\.(\d+)\."
    found = {int(m.group(1)) for key in specs if key.startswith(encoder.checkpoint_prefix)
             and (m := re.match(re.escape(encoder.checkpoint_prefix) + pattern, key))}
    if not found:
        raise ConversionError(f"The checkpoint has no layers of its {encoder.comfy_name} text encoder "
                              f"({encoder.checkpoint_prefix}...): it is incomplete.")
    return max(found) + 1 - (family == "sd2")


def _depths(specs: dict[str, TensorSpec], block: str) -> int:
    found = {int(match.group(1)) for key in specs
             if (match := re.match(re.escape(UNET_PREFIX + block) + r"\.transformer_blocks\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def unet_config(specs: dict[str, TensorSpec], arch: Arch, layout: UNetLayout, v_prediction: bool) -> dict:
    p = UNET_PREFIX
    firsts, index = [], 1
    for count in layout.res_blocks:
        firsts.append(index)
        index += count + 1
    channels = [specs[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0] for first in firsts]
    depths = [_depths(specs, f"input_blocks.{first}.1") for first in firsts]
    up_depths, index = [], 0
    for count in reversed(layout.res_blocks):
        up_depths.append([_depths(specs, f"output_blocks.{index + i}.1") for i in range(count + 1)])
        index += count + 1
    # diffusers gives its middle block the last level's transformer depth: free when that level has no
    # attention (SD1's last level), a constraint when it has (SDXL).
    middle = max(_depths(specs, "middle_block.1"), 1)
    depths = [d if d else (middle if level == len(depths) - 1 else 1) for level, d in enumerate(depths)]
    if middle != depths[-1]:
        raise ConversionError(f"This UNet's middle block has {middle} transformer layers and its last level {depths[-1]}: "
                              "diffusers' UNet2DConditionModel cannot hold that layout.")
    context = next(spec.shape[1] for key, spec in specs.items() if key.endswith("attn2.to_k.weight"))
    linear = len(next(spec for key, spec in specs.items() if key.endswith(".proj_in.weight")).shape) == 2
    config = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": {"sd1": 64, "sd2": 96 if v_prediction else 64, "sdxl": 128}[arch.name],
        "in_channels": specs[f"{p}input_blocks.0.0.weight"].shape[1], "out_channels": specs[f"{p}out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(layout.attention)],
        "block_out_channels": channels,
        "layers_per_block": layout.res_blocks[0] if len(set(layout.res_blocks)) == 1 else list(layout.res_blocks),
        "cross_attention_dim": context, "use_linear_projection": linear, "norm_num_groups": 32,
        # diffusers' historical name: "attention_head_dim" holds the number of heads. SD1 has 8 everywhere,
        # SD2 and SDXL 64-channel heads.
        "attention_head_dim": [8] * len(channels) if arch.name == "sd1" else [c // 64 for c in channels],
        "transformer_layers_per_block": depths,
        "upcast_attention": arch.name == "sd2" and v_prediction,
    }
    up_depths = [[d or depth for d in up] for up, depth in zip(up_depths, reversed(depths))]
    if any(up != [depth] * len(up) for up, depth in zip(up_depths, reversed(depths))):
        config["reverse_transformer_layers_per_block"] = up_depths
    if f"{p}label_emb.0.0.weight" in specs:  # SDXL: time ids and pooled text embedding
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                       "projection_class_embeddings_input_dim": specs[f"{p}label_emb.0.0.weight"].shape[1]})
    return config


def vae_config(specs: dict[str, TensorSpec], arch: Arch, prefix: str) -> dict:
    levels = sorted({int(m.group(1)) for key in specs if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", key))})
    if not levels:
        raise ConversionError("This checkpoint's VAE is not a KL autoencoder in ldm layout (first_stage_model.encoder."
                              "down.*): diffusers cannot hold it (a TAESD VAE?). Bake in a full VAE first.")
    blocks = {int(m.group(1)) for key in specs if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", key))}
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": specs[f"{prefix}encoder.conv_in.weight"].shape[1],
        "out_channels": specs[f"{prefix}decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [specs[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels],
        "layers_per_block": len(blocks), "latent_channels": specs[f"{prefix}encoder.conv_out.weight"].shape[0] // 2,
        "norm_num_groups": 32, "sample_size": SAMPLE_SIZES[arch.name], "scaling_factor": VAE_SCALES[arch.name],
        "force_upcast": True,
    }


def clip_config(specs: dict[str, TensorSpec], encoder: TextEncoder, layers: int, projection: bool) -> dict:
    p = encoder.checkpoint_prefix
    if encoder.openclip:
        vocab, width = specs[f"{p}token_embedding.weight"].shape
        positions = specs[f"{p}positional_embedding"].shape[0]
        mlp = specs[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection_dim = specs[f"{p}text_projection"].shape[1] if projection else width
    else:
        vocab, width = specs[f"{p}text_model.embeddings.token_embedding.weight"].shape
        positions = specs[f"{p}text_model.embeddings.position_embedding.weight"].shape[0]
        mlp = specs[f"{p}text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection_dim = width
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": width, "intermediate_size": mlp,
        "num_hidden_layers": layers, "num_attention_heads": width // 64, "max_position_embeddings": positions,
        "hidden_act": "gelu" if encoder.openclip else "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "initializer_factor": 1.0, "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0,
    }


def scheduler_config(v_prediction: bool) -> dict:
    """Euler, with SD's training schedule (scaled linear betas 0.00085..0.012 over 1000 steps)."""
    return {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if v_prediction else "epsilon", "steps_offset": 1,
        "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
        "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False, "trained_betas": None,
    }


def tokenizer_config(openclip: bool) -> dict:
    """CLIP's BPE tokenizer; OpenCLIP-trained encoders pad with '!' (token 0), CLIP-L with the end token."""
    return {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!" if openclip else "<|endoftext|>", "add_prefix_space": False,
    }
