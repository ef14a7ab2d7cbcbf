"""LoRA Network Settings: the adapter options beyond Train LoRA's widgets (conv rank, custom targets,
LoKr factor, continuing a LoRA file), passed as one TUNEKIT_NETWORK value."""

import folder_paths
from comfy_api.latest import io

from ..trainer.config import TrainConfig

NetworkType = io.Custom("TUNEKIT_NETWORK")
NO_FILE = "none"
DEFAULTS = TrainConfig()


class LoRANetworkSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitLoRANetworkSettings",
            display_name="LoRA Network Settings",
            category="TuneKit/train",
            description="Advanced adapter settings for Train LoRA's `network_settings` input.",
            inputs=[
                io.Int.Input("conv_rank", default=0, min=0, max=256,
                             tooltip="Rank of the 3x3 convolution layers (kohya conv_dim: LoCon, or targets 'all'); "
                                     "0: Train LoRA's rank. Often lower than the linear rank, e.g. 4-8."),
                io.Float.Input("conv_alpha", default=0.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="Alpha of the 3x3 convolution layers (kohya conv_alpha); 0: Train LoRA's alpha."),
                io.String.Input("target_pattern", default="",
                                tooltip="A regular expression over the denoiser's module paths (ComfyUI/ldm names such as "
                                        "'input_blocks.4.1.transformer_blocks.0.attn2.to_k'); layers it finds replace the "
                                        "targets preset. Example: 'attn2\\.(to_k|to_v)$' (cross-attention keys and values). "
                                        "Empty: use targets."),
                io.Int.Input("lokr_factor", default=DEFAULTS.lokr_factor, min=-1, max=1024,
                             tooltip="LoKr only: splits each layer dimension into factor x rest (LyCORIS factor); -1 "
                                     "splits near the square root. Smaller factors give smaller files."),
                io.Combo.Input("init_lora", options=[NO_FILE, *folder_paths.get_filename_list("loras")], default=NO_FILE,
                               tooltip="Continue training this LoRA from models/loras (a kohya or LyCORIS file, also one "
                                       "made elsewhere): its tensors are the starting point. It must match network, rank, "
                                       "alpha and targets; a mismatch is an error that says which to change."),
            ],
            outputs=[NetworkType.Output(display_name="network_settings")],
        )

    @classmethod
    def execute(cls, conv_rank, conv_alpha, target_pattern, lokr_factor, init_lora):
        init_path = folder_paths.get_full_path_or_raise("loras", init_lora) if init_lora != NO_FILE else ""
        return io.NodeOutput({"conv_rank": conv_rank, "conv_alpha": conv_alpha, "target_pattern": target_pattern.strip(),
                              "lokr_factor": lokr_factor, "init_lora": init_path})


NETWORK_NODES = [LoRANetworkSettings]
