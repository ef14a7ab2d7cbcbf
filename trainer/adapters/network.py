"""A set of side branches, keyed by kohya name, hooked onto the host's modules while training."""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .algorithms import ALGORITHMS, Algorithm

# Which denoiser modules get a branch, by ldm path (SD1 and SDXL share these names).
TARGET_PRESETS: dict[str, re.Pattern] = {
    # The attention projections: what diffusers' LoRA examples train.
    "attention": re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    # Every linear / 1x1 conv of the transformer blocks: kohya's default `networks.lora` target.
    "transformer": re.compile(
        r"\.(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
        r"|proj_in|proj_out)$"
    ),
    # Every Linear and Conv2d of the denoiser (res blocks, down/upsamplers, conv_in/out, time embedding,
    # attention): what ComfyUI's own TrainLoraNode trains; kohya calls the conv part LoCon.
    "all": re.compile(r""),
}
# What kohya's LoCon (conv_dim) adds: every layer of the res blocks (ResnetBlock2D: conv1, conv2,
# time_emb_proj, conv_shortcut) and of the down/upsamplers, by ldm path; 3x3 ones take conv rank/alpha.
LOCON_LAYERS = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)$")


@dataclass(frozen=True)
class NetworkSettings:
    """The adapter of one run: algorithm, rank / alpha per layer group, and the algorithms' options."""

    algorithm: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0  # layers with a kernel larger than 1x1; 0: rank
    conv_alpha: float = 0.0  # 0: alpha
    factor: int = -1  # LoKr's split of each dimension; -1: near its square root

    @property
    def spec(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    def rank_alpha(self, module: nn.Module) -> tuple[int, float]:
        if is_spatial_conv(module):
            return self.conv_rank or self.rank, self.conv_alpha or self.alpha
        return self.rank, self.alpha


def is_spatial_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and math.prod(module.kernel_size) > 1


def select_targets(modules: dict[str, nn.Module], preset: str, pattern: str = "",
                   conv_layers: bool = False) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules a preset (or a custom regex over the ldm path, which replaces it) names,
    plus with `conv_layers` those of the res blocks and samplers (LoCon), in model order."""
    chosen = re.compile(pattern) if pattern else TARGET_PRESETS[preset]
    return {
        path: module
        for path, module in modules.items()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        and (chosen.search(path) or (conv_layers and LOCON_LAYERS.search(path)))
    }


class AdapterNetwork(nn.Module):
    """Owns the trainable branches; the host's modules are only referenced, never registered."""

    def __init__(self, targets: dict[str, nn.Module], rank: int = 16, alpha: float = 16.0,
                 settings: NetworkSettings | None = None):
        super().__init__()
        self.settings = settings or NetworkSettings(rank=rank, alpha=alpha)
        self._targets = targets  # kohya name -> host module (a plain dict: not our parameters)
        self.branches = nn.ModuleDict({name: self._branch(module) for name, module in targets.items()})
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # kohya name -> hook

    def _branch(self, module: nn.Module) -> nn.Module:
        spec, settings = self.settings.spec, self.settings
        options = {option: getattr(settings, option) for option in spec.options}
        return spec.branch(module, *settings.rank_alpha(module), **options)

    def attach(self, prefix: str = "") -> None:
        """Add each branch's output to its module's output (forward hooks). `prefix` picks the branches
        whose kohya names start with it ('lora_unet', 'lora_te'): each model's clone attaches its own."""
        self.detach(prefix)
        for name, module in self._targets.items():
            if name.startswith(prefix):
                self._hooks[name] = self.branches[name].hook_onto(module)

    def detach(self, prefix: str = "") -> None:
        for name in [name for name in self._hooks if name.startswith(prefix)]:
            self._hooks.pop(name).remove()

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, branch in self.branches.items():
            tensors.update(branch.kohya_tensors(name))
        return {
            key: (value.to(dtype) if dtype is not None else value).detach().cpu().clone()
            for key, value in tensors.items()
        }

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the saved state") -> None:
        """Load saved branches: the same algorithm, layers, shapes (ranks) and alphas, or a ConfigError
        that says which setting to change."""
        if problems := self.mismatches(tensors, source):
            raise ConfigError(problems)
        for name, branch in self.branches.items():
            branch.load_kohya_tensors(name, tensors)

    def mismatches(self, tensors: dict[str, torch.Tensor], source: str) -> list[str]:
        kind, expected = file_kind(tensors), self.settings.spec.file_kind
        if kind != expected:
            return [f"{source} is a {kind} file, but network is '{self.settings.algorithm}': set network to "
                    f"{_ALGORITHMS_WRITING[kind]} (or start without it)."]
        ours = self.kohya_state_dict()
        theirs = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
        problems = []
        if missing := [name for name in self.branches if name not in theirs]:
            problems.append(f"{source} lacks {len(missing)} of the {len(self.branches)} layers this run trains, "
                            f"e.g. {missing[0]}: choose the targets it was trained with.")
        if extra := sorted(theirs - set(self.branches)):
            problems.append(f"{source} holds {len(extra)} layers this run does not train, e.g. {extra[0]}: "
                            f"choose targets (or network) that include them.")
        problems += _shape_mismatches(ours, tensors, source)
        return problems


def file_kind(tensors: dict[str, torch.Tensor]) -> str:
    """Which family of keys a kohya / LyCORIS file holds."""
    if any(key.endswith(".dora_scale") for key in tensors):
        return "dora"
    for marker, kind in ((".hada_w1_a", "loha"), (".lokr_w1", "lokr"), (".lora_down.weight", "lora")):
        if any(marker in key for key in tensors):
            return kind
    return "unknown"


_ALGORITHMS_WRITING = {kind: " or ".join(f"'{name}'" for name, spec in ALGORITHMS.items() if spec.file_kind == kind)
                       for kind in ("lora", "loha", "lokr", "dora")} | {"unknown": "an algorithm TuneKit trains"}


def _shape_mismatches(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], source: str) -> list[str]:
    """The first mismatched shape (a rank) and the first mismatched alpha, each with the setting to change."""
    problems = []
    held = {key.split(".", 1)[0] for key in theirs}
    for key, tensor in ours.items():
        if key.endswith(".alpha") or key.split(".", 1)[0] not in held:
            continue
        if key not in theirs:
            problems.append(f"{source} lacks {key} (it has other keys for that layer): set rank (or conv_rank, "
                            f"LoKr's factor) to what it was trained with.")
            break
        if theirs[key].shape != tensor.shape:
            problems.append(f"{source} has {key} of shape {list(theirs[key].shape)}, this run makes "
                            f"{list(tensor.shape)}: set rank (or conv_rank, LoKr's factor) to what it was trained with.")
            break
    for key, tensor in ours.items():
        if key.endswith(".alpha") and key in theirs and float(theirs[key]) != float(tensor):
            problems.append(f"{source} has alpha {float(theirs[key])} at {key}, this run {float(tensor)}: set "
                            f"alpha (or conv_alpha) to {float(theirs[key])}.")
            break
    return problems
