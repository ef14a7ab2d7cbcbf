"""Registers TuneKit's nodes with ComfyUI (V3 extension API, present from ComfyUI 0.3.75 on)."""

from comfy_api.latest import ComfyExtension, io

from .caption_nodes import CAPTION_NODES
from .convert_nodes import CONVERT_NODES
from .dataset_nodes import DATASET_NODES
from .train_nodes import SaveLoRA, TrainLoRA


class TuneKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*DATASET_NODES, TrainLoRA, SaveLoRA, *CONVERT_NODES, *CAPTION_NODES]
