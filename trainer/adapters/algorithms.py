"""The adapter algorithms a run can choose, by name: branch type, how the saved file declares it, and its cost."""

from dataclasses import dataclass, field

from .base import AdapterBranch
from .dora import DoRABranch
from .loha import LoHaBranch
from .lokr import LoKrBranch
from .lora import LoRABranch


@dataclass(frozen=True)
class Algorithm:
    branch: type[AdapterBranch]
    network_module: str  # kohya `ss_network_module`: which trainer's network made (and reloads) the file
    network_args: dict[str, str]  # its fixed `ss_network_args` (LyCORIS reads `algo`, `dora_wd`)
    conv_layers: bool  # the res blocks' and samplers' 3x3 convolutions join the targets (kohya LoCon)
    file_kind: str  # what the saved keys look like (lora_down / hada_ / lokr_ / + dora_scale)
    cost: str  # for the node's tooltip
    options: tuple[str, ...] = field(default=())  # NetworkSettings fields the branch takes


ALGORITHMS: dict[str, Algorithm] = {
    "lora": Algorithm(LoRABranch, "networks.lora", {}, False, "lora",
                      "low-rank pair per layer; no full-size tensor; the fastest and smallest"),
    "locon": Algorithm(LoRABranch, "networks.lora", {}, True, "lora",
                       "LoRA plus the res blocks' 3x3 convolutions (conv rank/alpha); more steps' time and a bigger file"),
    "loha": Algorithm(LoHaBranch, "lycoris.kohya", {"algo": "loha"}, False, "loha",
                      "Hadamard product of two low-rank pairs (effective rank up to rank^2): forms each layer's "
                      "full-size delta every step, about 3 weight-sized fp32 tensors per layer for backward"),
    "lokr": Algorithm(LoKrBranch, "lycoris.kohya", {"algo": "lokr"}, False, "lokr",
                      "Kronecker product of a small and a (low-rank) large factor (factor sets the split): tiny "
                      "files; forms each layer's full-size delta every step (one weight-sized fp32 tensor per layer)",
                      options=("factor",)),
    "dora": Algorithm(DoRABranch, "lycoris.kohya", {"algo": "lora", "dora_wd": "True"}, False, "dora",
                      "LoRA plus a trained magnitude per input column (weight-decomposed): forms W + BA once per "
                      "layer and step for its norms (no gradient), about +30% step time over LoRA"),
}
