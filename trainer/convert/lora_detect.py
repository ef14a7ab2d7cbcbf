"""Which model family a LoRA is for, from its metadata, its key names, then its tensor shapes."""

from .arch import ARCHS, SD1_ARCH, SD2_ARCH, SDXL_ARCH, Arch, arch_from_metadata, get_arch
from .errors import UnknownArchitectureError
from .lora_keys import RawKey

_BY_CONTEXT = {arch.context_dim: arch for arch in ARCHS.values()}
# Parameters whose last dimension is the layer's input width.
_INPUT_SIDE = ("lora_down.weight", "hada_w1_b", "hada_w2_b", "diff")


def detect_lora_arch(raws: list[RawKey], shapes: dict[str, tuple], metadata: dict[str, str],
                     family: str | None = None) -> Arch:
    if family:
        return get_arch(family)
    if arch := arch_from_metadata(metadata):
        return arch
    if arch := _from_names(raws):
        return arch
    if arch := _from_shapes(raws, shapes):
        return arch
    raise UnknownArchitectureError(
        f"Cannot tell which model this LoRA is for: no ss_base_model_version/modelspec metadata, no key that only "
        f"one family uses, and no cross-attention or text-encoder layer whose width says it ({len(raws)} keys, "
        f"e.g. '{raws[0].key if raws else '-'}'). Name the family ({', '.join(ARCHS)})."
    )


def _from_names(raws: list[RawKey]) -> Arch | None:
    namings = {raw.naming for raw in raws if raw.component != "unet"}
    if any(raw.component == "te2" for raw in raws) or namings & {"lora_te1", "clip_g"}:
        return SDXL_ARCH
    if "clip_h" in namings:
        return SD2_ARCH
    return None


def _from_shapes(raws: list[RawKey], shapes: dict[str, tuple]) -> Arch | None:
    for raw in raws:
        shape = shapes[raw.key]
        if raw.param not in _INPUT_SIDE or len(shape) != 2:
            continue
        name = raw.name.replace("_", ".")
        if raw.component == "unet" and name.endswith(("attn2.to.k", "attn2.to.v")) and shape[1] in _BY_CONTEXT:
            return _BY_CONTEXT[shape[1]]
        if raw.component == "te1" and name.endswith("q.proj"):
            return SD2_ARCH if shape[1] == 1024 else SD1_ARCH if shape[1] == 768 else None
    return None
