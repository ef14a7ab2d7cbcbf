"""Training Options: the optimizer, schedule, loss, precision and checkpointing options beyond Train LoRA's
widgets, passed as one TUNEKIT_TRAINING_OPTIONS value (a dict of TrainConfig fields, validated with the rest
of the config when Train LoRA runs)."""

from comfy_api.latest import io

from ..trainer.config import (
    LR_SCHEDULERS,
    MEMORY_MODES,
    MIXED_PRECISIONS,
    NUM_TIMESTEPS,
    OPTIMIZERS,
    PREDICTION_TYPES,
    TIMESTEP_BIAS_STRATEGIES,
    TrainConfig,
)

OptionsType = io.Custom("TUNEKIT_TRAINING_OPTIONS")
# The tooltip of every trainer's `options` input.
OPTIONS_INPUT_HELP = ("From Training Options: optimizer, LR schedule, gradient accumulation, Min-SNR, noise offset, "
                      "timestep bias, caption dropout, EMA, mixed precision, gradient checkpointing, clip skip. Without "
                      "it: AdamW at a constant learning rate, fp32.")
DEFAULTS = TrainConfig()

OPTIMIZER_HELP = (
    "'adamw': torch AdamW, the safe default. 'adamw8bit': bitsandbytes AdamW with 8-bit state (about 75% less "
    "optimizer memory; needs bitsandbytes). 'adafactor': factored second moments, least memory (transformers). "
    "'lion': sign updates, one state tensor; use a 3-10x lower learning rate. 'prodigy': finds its own step size; "
    "set learning_rate to 1.0. 'schedule_free_adamw': no LR schedule needed (lr_scheduler 'constant'); the "
    "averaged weights are saved. 'lion', 'prodigy', 'schedule_free_adamw' need pytorch-optimizer. 'sgd': SGD "
    "with momentum 0.9, needs a much higher learning rate."
)


def _float(name: str, minimum: float, maximum: float, step: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=getattr(DEFAULTS, name), min=minimum, max=maximum, step=step, tooltip=tooltip)


def _int(name: str, minimum: int, maximum: int, tooltip: str) -> io.Int.Input:
    return io.Int.Input(name, default=getattr(DEFAULTS, name), min=minimum, max=maximum, tooltip=tooltip)


def _combo(name: str, options, tooltip: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=list(options), default=getattr(DEFAULTS, name), tooltip=tooltip)


def _bool(name: str, tooltip: str) -> io.Boolean.Input:
    return io.Boolean.Input(name, default=getattr(DEFAULTS, name), tooltip=tooltip)


OPTION_INPUTS = [
    _combo("optimizer", OPTIMIZERS, OPTIMIZER_HELP),
    _float("weight_decay", 0.0, 1.0, 0.001, "Decoupled weight decay; pulls weights toward 0. 0.01 is AdamW's usual value."),
    _float("unet_lr", 0.0, 1.0, 1e-6, "Learning rate of the UNet's parameters; 0: Train LoRA's learning_rate."),
    _combo("lr_scheduler", LR_SCHEDULERS,
           "How the learning rate changes over the steps (diffusers' get_scheduler): 'constant', "
           "'constant_with_warmup', 'cosine' (down to 0), 'cosine_with_restarts', 'linear' (down to 0), 'polynomial'."),
    _int("lr_warmup_steps", 0, 1_000_000, "Steps over which the learning rate rises from 0 (not with 'constant'); "
         "5-10% of the steps is typical. Costs nothing."),
    _int("lr_scheduler_num_cycles", 1, 1000, "Restarts of 'cosine_with_restarts'."),
    _float("lr_scheduler_power", 0.01, 10.0, 0.1, "Power of the 'polynomial' schedule (1: linear)."),
    _int("gradient_accumulation_steps", 1, 1024,
         "Sum the gradients of this many batches per optimizer step: a larger effective batch without more memory; "
         "each step then takes this many times longer. Train LoRA's steps count optimizer steps."),
    _float("max_grad_norm", 0.0, 100.0, 0.1, "Clip the gradient norm to this (0: off; 1.0 is kohya's default). "
           "Tames loss spikes; costs one norm per step."),
    _float("min_snr_gamma", 0.0, 100.0, 0.5,
           "Min-SNR-gamma loss weighting (Hang et al. 2023): weights easy, low-noise timesteps down so training "
           "converges faster; 5 is the paper's value, 0 off. Free."),
    _float("noise_offset", 0.0, 1.0, 0.01, "Adds offset x per-channel noise, so the model can learn very dark or "
           "bright images; 0.05-0.1 is typical, 0 off. Free."),
    _combo("prediction_type", PREDICTION_TYPES,
           "'auto': what the MODEL predicts (its model_sampling; ModelSamplingDiscrete changes it). A value that "
           "contradicts the model is an error."),
    _bool("zero_terminal_snr", "Train with the last timestep at pure noise (Lin et al. 2024): v-prediction models only; "
          "sample the result with ModelSamplingDiscrete zsnr on. If the MODEL already has zsnr, it is used as is."),
    _combo("timestep_bias_strategy", TIMESTEP_BIAS_STRATEGIES,
           "Train some timesteps more often (diffusers' SDXL recipe): 'earlier' (low noise: details), 'later' (high "
           "noise: composition), 'range' (begin..end), 'none'. Free."),
    _float("timestep_bias_multiplier", 0.01, 100.0, 0.1, "How much more often the biased timesteps are drawn "
           "(below 1: less often)."),
    _float("timestep_bias_portion", 0.0, 1.0, 0.05, "Fraction of the timesteps 'earlier' / 'later' bias."),
    io.Int.Input("timestep_bias_begin", default=DEFAULTS.timestep_bias_begin, min=0, max=NUM_TIMESTEPS,
                 tooltip="First timestep of the 'range' strategy."),
    io.Int.Input("timestep_bias_end", default=DEFAULTS.timestep_bias_end, min=1, max=NUM_TIMESTEPS,
                 tooltip="End (exclusive) of the 'range' strategy."),
    _float("caption_dropout_rate", 0.0, 0.99, 0.01,
           "Share of images trained with an empty prompt (where the dataset sets no dropout of its own): keeps the "
           "model usable without the trigger word and helps CFG; turns the caption cache off. 0.05-0.1 is typical."),
    _float("ema_decay", 0.0, 0.99999, 0.0001,
           "Keep an exponential moving average of the trained weights (e.g. 0.999; 0 off): smoother results, one "
           "more copy of the trained weights in memory."),
    _bool("save_ema", "With EMA on: save and apply the EMA weights (on) or the raw trained ones (off)."),
    _combo("mixed_precision", MIXED_PRECISIONS,
           "Compute precision of the forward pass: 'bf16' about halves activation memory and is faster on recent "
           "GPUs; 'fp16' also, with loss scaling against underflow; 'fp32' on CPUs. Trained weights stay fp32."),
    _bool("gradient_checkpointing", "Recompute each UNet block's activations in the backward pass instead of "
          "keeping them: much less memory, about 30% more time per step."),
    _combo("memory_mode", MEMORY_MODES,
           "Before training, estimate the memory the run adds (adapters, optimizer state, activations at this batch "
           "and resolution) against what the device has free. 'auto': where it does not fit, turn gradient "
           "checkpointing on, then halve batch_size (raising gradient_accumulation_steps to keep the images per "
           "step), and say so. 'fit-check': stop before any work with the estimate and what to lower. 'off': no check."),
    _int("clip_skip", 1, 12, "Encode captions from an earlier CLIP layer (2: the penultimate, as many anime models "
         "expect); sample with CLIPSetLastLayer -N to match. SD 1.x/2.x only."),
    _bool("deterministic", "torch's deterministic algorithms during training: bit-identical runs for a seed (CPU ones "
          "are already); can be slower on GPUs."),
    _int("loss_every", 1, 10_000, "Read the loss back every N steps (a device sync each time), checking it for NaN. "
         "Higher is faster on GPUs; after a NaN the state at the last good read is kept."),
]


class TrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitTrainingOptions",
            display_name="Training Options",
            category="TuneKit/train",
            description="Optimizer, learning-rate schedule, loss weighting, noise, EMA, precision and memory options "
                        "for Train LoRA's `options` input. All are checked together when training starts; a bad "
                        "combination is an error naming the input and the fix. They are saved in the LoRA's ss_* "
                        "metadata and in config.toml next to every saved state.",
            inputs=OPTION_INPUTS,
            outputs=[OptionsType.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, **options):
        return io.NodeOutput(options)


OPTIONS_NODES = [TrainingOptions]
