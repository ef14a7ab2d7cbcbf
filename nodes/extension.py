"""Registers TuneKit's nodes with ComfyUI (V3 extension API, present from ComfyUI 0.3.75 on)."""

from comfy_api.latest import ComfyExtension, io

from .caption_nodes import CAPTION_NODES
from .caption_routes import register_caption_routes
from .convert_nodes import CONVERT_NODES
from .dataset_nodes import DATASET_NODES
from .dreambooth_nodes import DREAMBOOTH_NODES
from .embedding_nodes import EMBEDDING_NODES
from .finetune_nodes import FINETUNE_NODES
from .monitor_nodes import SampleAndValidate
from .network_nodes import NETWORK_NODES
from .options_nodes import OPTIONS_NODES
from .train_nodes import SaveLoRA, TrainLoRA


class TuneKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_caption_routes()  # ComfyUI 0.3.75 calls get_node_list at load but never on_load
        return [*DATASET_NODES, TrainLoRA, SaveLoRA, *OPTIONS_NODES, *NETWORK_NODES, *CONVERT_NODES, *CAPTION_NODES, *DREAMBOOTH_NODES, *FINETUNE_NODES, *EMBEDDING_NODES,
                SampleAndValidate]
