"""Training the text encoders: which encoders train, which CLIP layers get a LoRA branch, their kohya names
and learning rates (a full fine-tune of the encoders uses the same selection, prefixes and rates).

kohya (sd-scripts `networks/lora.py`) and ComfyUI's `model_lora_keys_clip` name a text-encoder branch
`<prefix>_<transformers path with '_'>`: `lora_te_text_model_encoder_layers_0_self_attn_q_proj`. A model
with one encoder (SD1/SD2) uses `lora_te`; SDXL uses `lora_te1` for CLIP-L and `lora_te2` for CLIP-G.
"""

import re

from torch import nn

from .config import TrainConfig
from .errors import ConfigError

# The linear layers kohya trains in every CLIP encoder layer (ComfyUI's LORA_CLIP_MAP).
TEXT_ENCODER_TARGETS = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# Which encoders each `text_encoders` setting trains, by position (1: SD1's only encoder or SDXL's CLIP-L).
ENCODER_POSITIONS = {"none": (), "all": (1, 2), "te1": (1,), "te2": (2,)}


def kohya_prefixes(encoder_names: list[str]) -> dict[str, str]:
    """Encoder name ('clip_l', 'clip_g') -> kohya prefix; one encoder is plain `lora_te`."""
    if len(encoder_names) == 1:
        return {encoder_names[0]: "lora_te"}
    return {name: f"lora_te{position}" for position, name in enumerate(encoder_names, start=1)}


def chosen_encoders(encoders: dict[str, dict[str, nn.Module]], config: TrainConfig) -> dict[str, tuple[str, dict]]:
    """The encoders `config.text_encoders` trains: kohya prefix -> (encoder name, its modules by transformers
    path). `encoders`: encoder name -> {transformers path: module}, in the model's order (SDXL: CLIP-L first)."""
    positions = ENCODER_POSITIONS[config.text_encoders]
    names = list(encoders)
    if config.text_encoders == "te2" and len(names) < 2:
        raise ConfigError([(
            f"text_encoders is '{config.text_encoders}' but this model has one text encoder: choose "
            f"'all' or 'te1' (only SDXL has a second encoder, CLIP-G)."
        )])
    return {prefix: (name, encoders[name]) for name, prefix in kohya_prefixes(names).items()
            if names.index(name) + 1 in positions}


def text_encoder_targets(encoders: dict[str, dict[str, nn.Module]], config: TrainConfig) -> dict[str, nn.Module]:
    """The CLIP linear layers to train, by kohya name (`encoders` as for chosen_encoders)."""
    targets = {}
    for prefix, (_, modules) in chosen_encoders(encoders, config).items():
        for path, module in modules.items():
            if isinstance(module, nn.Linear) and TEXT_ENCODER_TARGETS.match(path):
                targets[f"{prefix}_{path.replace('.', '_')}"] = module
    return targets


def group_name(kohya_name: str) -> str:
    """The learning-rate group of a kohya-named part: 'unet', 'text_encoder' (SD1's encoder, SDXL CLIP-L) or
    'text_encoder_2' (SDXL CLIP-G)."""
    if kohya_name.startswith("lora_te2"):
        return "text_encoder_2"
    return "text_encoder" if kohya_name.startswith("lora_te") else "unet"


def group_learning_rate(group: str, config: TrainConfig) -> float:
    """The UNet trains at the UNet rate; SDXL CLIP-G at text_encoder_2_lr when set, else text_encoder_lr."""
    if group == "unet":
        return config.effective_unet_lr
    if group == "text_encoder_2" and config.text_encoder_2_lr:
        return config.text_encoder_2_lr
    return config.effective_text_encoder_lr


def param_groups_by_name(named: list[tuple[str, nn.Parameter]], config: TrainConfig) -> list[dict]:
    """(kohya name, parameter) pairs as optimizer groups by learning rate, each only where it has parameters."""
    groups: dict[str, dict] = {}
    for kohya, parameter in named:
        name = group_name(kohya)
        group = groups.setdefault(name, {"params": [], "lr": group_learning_rate(name, config), "name": name})
        group["params"].append(parameter)
    return list(groups.values())


def network_param_groups(network: nn.Module, config: TrainConfig) -> list[dict]:
    """An AdapterNetwork's parameters grouped by learning rate (see param_groups_by_name)."""
    # branches.<kohya name>.down.weight
    return param_groups_by_name([(path.split(".")[1], p) for path, p in network.named_parameters()], config)
