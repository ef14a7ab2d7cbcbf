"""Worker: ComfyUI's own TrainLoraNode (comfy_extras/nodes_train.py), called as the executor calls it.

Same model build as the TuneKit worker (ComfyUI's classes, inference mode, a ModelPatcher). The node
trains every weight of the model (LoRA on each Linear/Conv, a full diff on every 1-D weight and bias)
at alpha 1; it offers no target choice, so it runs only on ComfyUI's target set. Settings are pinned
and written to the result. Step times come from a global optimizer step hook (the node runs all its
steps inside one call).
"""

import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_common as wc  # noqa: E402


def node_settings(spec: dict, accepted) -> dict:
    """The node's settings, pinned; of the inputs newer ComfyUI added, those this node (`accepted`: its
    input names) declares."""
    settings = {
        "batch_size": spec["batch"], "grad_accumulation_steps": 1, "learning_rate": 1e-4, "rank": spec["rank"],
        "optimizer": "AdamW", "loss_function": "MSE", "seed": spec["seed"],
        "training_dtype": "fp32" if spec["dtype"] == "fp32" else "bf16",
        "lora_dtype": "fp32" if spec["dtype"] == "fp32" else "bf16",
        "algorithm": "LoRA", "gradient_checkpointing": spec["comfy_checkpointing"], "existing_lora": "[None]",
    }
    newer = {"quantized_backward": False, "checkpoint_depth": 1, "offloading": False, "bucket_mode": False,
             "bypass_mode": spec.get("comfy_bypass", False)}
    settings.update({key: value for key, value in newer.items() if key in accepted})
    return settings


def accepted_inputs(node) -> set[str]:
    return set(inspect.signature(node.execute).parameters)


def node_inputs(spec: dict, settings: dict, patcher, steps: int) -> dict:
    """The node's inputs as the executor passes them (is_input_list: every input is a list)."""
    latents, context, pooled = wc.make_inputs(spec)
    # One LATENT per image: with a single LATENT input 0.3.75's node fails (UnboundLocalError: multi_res),
    # so a batch of one is given as the same latent twice (the node then picks one per step).
    images = list(range(spec["batch"])) if spec["batch"] > 1 else [0, 0]
    latent_inputs = [{"samples": latents[i : i + 1]} for i in images]
    positive = []
    for i in images:
        extra = {}
        if pooled is not None:
            side = spec["resolution"]
            extra = {"pooled_output": pooled[i : i + 1], "width": side, "height": side,
                     "target_width": side, "target_height": side, "crop_w": 0, "crop_h": 0}
        positive.append([[context[i : i + 1], extra]])
    inputs = {key: [value] for key, value in settings.items()}
    inputs.update(model=[patcher], latents=latent_inputs, positive=positive, steps=[steps])
    return inputs


def lora_and_losses(outputs) -> tuple[dict, dict]:
    """The node's LoRA and loss map: 0.3.75 returns (model, lora, loss map, steps), 0.30.0 (lora, loss map,
    steps)."""
    values = outputs.args
    return (values[1], values[2]) if len(values) == 4 else (values[0], values[1])


def main() -> None:
    spec, out = wc.load_spec()
    with wc.Result(spec, out, "comfy_train_lora_node") as result:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        torch.manual_seed(spec["seed"])
        wc.import_comfy(spec)
        import comfy.utils
        import comfy_extras.nodes_train as nodes_train

        comfy.utils.PROGRESS_BAR_ENABLED = False
        result["comfy_attention"] = wc.comfy_attention_name()
        result.phase = "load"
        patcher = wc.build_comfy_model(spec)
        result["model_params"] = wc.count_params(patcher.model.diffusion_model)
        result["rss_loaded_mb"] = wc.rss_mb()
        settings = node_settings(spec, accepted_inputs(nodes_train.TrainLoraNode))
        result["settings"] = {**settings, "alpha": 1.0, "targets": "every weight (node has no choice)",
                              "attention": result.data["comfy_attention"]}
        wc.reset_peak_rss()

        stamps = []
        hook = register_optimizer_step_post_hook(lambda *args: stamps.append(wc.clocks()))
        result.phase = "train"
        stamps.append(wc.clocks())  # the first step also holds the node's setup: a warm-up step
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            steps = spec["warmup"] + spec["steps"]
            outputs = nodes_train.TrainLoraNode.execute(**node_inputs(spec, settings, patcher, steps))
        result.data.update(wc.summarise_steps(stamps, spec["warmup"]))
        wc.memory_after_training(result)
        lora, loss_map = lora_and_losses(outputs)
        result["trainable_params"] = sum(t.numel() for t in lora.values())
        result["adapted_layers"] = sum(key.endswith(".lora_up.weight") for key in lora)
        result["adapted_tensors"] = len(lora)
        result["losses"] = loss_map["loss"]
        del outputs, lora

        result.phase = "flops"
        stamps.clear()
        with wc.FlopCount() as flops, torch.inference_mode():
            nodes_train.TrainLoraNode.execute(**node_inputs(spec, settings, patcher, 1))
        hook.remove()
        result["flops_per_step"] = flops.total
        result["flops_by_op"] = flops.by_op


if __name__ == "__main__":
    main()
