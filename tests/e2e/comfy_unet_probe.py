"""Checks run inside the host's Python against ComfyUI's own UNet classes (no server); prints one JSON.

    python comfy_unet_probe.py names     # kohya names of the 'all' preset resolve in ComfyUI's LoRA key map
    python comfy_unet_probe.py storage   # training aliases the host's weights: same storage, nothing copied

Run by tests/e2e/test_comfy_unet.py with the host's environment; ComfyUI's folder is argv[2].
"""

import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A small SD1.5-shaped UNet (the checks do not depend on size) and the real SD1.5 / SDXL layouts.
SMALL_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 4, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15 = {**SMALL_SD15, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
SDXL = {**SMALL_SD15, "num_classes": "sequential", "adm_in_channels": 2816, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_head_channels": 64, "num_heads": -1, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}


def setup(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    package = types.ModuleType("tunekit")
    package.__path__ = [str(REPO)]
    sys.modules["tunekit"] = package


def check_names() -> dict:
    import torch

    import comfy.lora
    import comfy.supported_models
    import comfy.utils
    from tunekit.trainer.adapters import select_targets
    from tunekit.nodes.bridge import COMFY_FAMILIES
    from tunekit.trainer.families import get_family

    report = {}
    for config_class, unet_config in ((comfy.supported_models.SD15, SD15), (comfy.supported_models.SDXL, SDXL)):
        model_config = config_class(unet_config)
        model = model_config.get_model({}, "", device="meta")
        family = get_family(COMFY_FAMILIES[config_class.__name__])
        levels = list(unet_config["num_res_blocks"])
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        # SD1 kohya names must be the diffusers-style ones (what A1111 and kohya write), not ldm-style.
        diffusers_style = {
            "lora_unet_" + k[: -len(".weight")].replace(".", "_"): "diffusion_model." + v
            for k, v in comfy.utils.unet_to_diffusers(model_config.unet_config).items() if k.endswith(".weight")
        }
        targets = select_targets(dict(model.diffusion_model.named_modules()), "all")
        wrong, names = [], set()
        for path in targets:
            name = family.kohya_unet_name(path, levels)
            names.add(name)
            table = diffusers_style if family.name == "sd1" else key_map
            if table.get(name) != f"diffusion_model.{path}.weight":
                wrong.append((path, name, table.get(name)))
        every = [n for n, m in model.diffusion_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        report[config_class.__name__] = {"targets": len(targets), "linear_and_conv": len(every),
                                         "unique_names": len(names), "wrong": wrong[:10]}
    return report


def check_storage() -> dict:
    import numpy as np
    import torch

    import comfy.ldm.modules.attention as attention
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from tunekit.nodes.bridge import ComfyModelBridge
    from tunekit.trainer.config import TrainConfig
    from tunekit.trainer.data import Dataset, TrainImage
    from tunekit.trainer.events import StepDone
    from tunekit.trainer.host import PromptEmbedding
    from tunekit.trainer.session import TrainSession

    model_config = comfy.supported_models.SD15(SMALL_SD15)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():  # as CheckpointLoader loads weights inside a node
        model = model_config.get_model({}, "", device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        for parameter in model.diffusion_model.parameters():
            parameter.normal_(0, 0.05, generator=generator)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    unet = model.diffusion_model
    originals = {name: p for name, p in unet.named_parameters()}
    storage = {name: p.untyped_storage().data_ptr() for name, p in originals.items()}

    class Bridge(ComfyModelBridge):
        def encode_images(self, pixels):
            return torch.randn(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

        def vae_identity(self):
            return "probe"

        def encode_prompts(self, captions):
            return [PromptEmbedding(torch.randn(77, 768)) for _ in captions]

    seen = []

    class Host:
        def emit(self, event):
            if isinstance(event, StepDone):  # inside training: the clone is loaded, the aliases in place
                params = dict(unet.named_parameters())
                seen.append({
                    "aliases": sum(params[n] is not originals[n] for n in params),
                    "inference": sum(p.is_inference() for p in params.values()),
                    "requires_grad": sum(p.requires_grad for p in params.values()),
                    "same_storage": sum(params[n].untyped_storage().data_ptr() == storage[n] for n in params),
                    "same_data": sum(params[n].data_ptr() == originals[n].data_ptr() for n in params),
                    "matmul_routes": routed_convs(unet),
                })

        def should_stop(self):
            return False

    calls = {"sdpa": 0}
    sdpa = attention.attention_pytorch

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    attention.attention_pytorch = counting_sdpa  # the bridge looks it up at call time
    image = TrainImage("probe 0", "a probe", np.full((64, 64, 3), 128, dtype=np.uint8))
    config = TrainConfig(steps=2, rank=4, alpha=4, resolution=64, targets="all", learning_rate=1e-3)
    with torch.inference_mode():
        session = TrainSession(Bridge(patcher, None, None), Dataset.from_images([image]), config)
        session.run(Host())
    after = dict(unet.named_parameters())
    return {
        "parameters": len(originals),
        "branches": len(session.network.branches),
        "branch_grads": sum(p.grad is not None for p in session.network.parameters()),
        "during_steps": seen,
        "restored": sum(after[n] is originals[n] for n in after),
        "hooks_left": sum(len(m._forward_hooks) for m in unet.modules()),
        "matmul_routes_left": routed_convs(unet),
        "default_attention": attention.optimized_attention.__name__,
        "sdpa_calls": calls["sdpa"],
    }


def routed_convs(unet) -> int:
    """Convolutions carrying trainer/conv_matmul.py's per-call route (an instance `_conv_forward`)."""
    return sum("_conv_forward" in vars(module) for module in unet.modules())


if __name__ == "__main__":
    setup(sys.argv[2])
    check = {"names": check_names, "storage": check_storage}[sys.argv[1]]
    print("PROBE " + json.dumps(check()))
