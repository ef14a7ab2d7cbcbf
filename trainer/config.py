"""Training settings of every method: one versioned dataclass, validated as a whole before any model work.

Names follow kohya's sd-scripts where one exists (so a recipe's values carry over); `to_toml` writes the
flat file saved next to every artefact, `from_toml` reads it back.
"""

import re
import tomllib
from dataclasses import asdict, dataclass, fields

from .adapters import ALGORITHMS, TARGET_PRESETS, NetworkSettings
from .errors import ConfigError

CONFIG_VERSION = 2

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "lion", "prodigy", "schedule_free_adamw", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_MODES = ("auto", "fit-check", "off")  # trainer/memory.py
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
TEXT_ENCODER_SETS = ("none", "all", "te1", "te2")  # trainer/text_encoders.py
NUM_TIMESTEPS = 1000  # the DDPM schedule of every SD model


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps (each sums gradient_accumulation batches)
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    targets: str = "transformer"
    save_every: int = 0  # 0: save only at the end (and on cancel)
    # ----- adapter network (trainer/adapters) -----
    network: str = "lora"  # lora, locon, loha, lokr, dora
    conv_rank: int = 0  # layers with a 3x3 kernel (kohya conv_dim); 0: rank
    conv_alpha: float = 0.0  # kohya conv_alpha; 0: alpha
    target_pattern: str = ""  # a regex over the denoiser's ldm module paths; replaces the targets preset
    lokr_factor: int = -1  # LoKr's split of each dimension; -1: near its square root
    init_lora: str = ""  # a kohya / LyCORIS file to continue training from
    # ----- optimizer and schedule -----
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    unet_lr: float = 0.0  # 0: learning_rate
    text_encoder_lr: float = 0.0  # 0: learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts
    lr_scheduler_power: float = 1.0  # polynomial
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    # ----- loss and noise -----
    min_snr_gamma: float = 0.0  # 0: off; 5 is the paper's value
    noise_offset: float = 0.0
    prediction_type: str = "auto"  # must agree with the model's model_sampling
    zero_terminal_snr: bool = False
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = NUM_TIMESTEPS
    caption_dropout_rate: float = 0.0  # run-wide; a subset's own rate wins where set
    # ----- weights and precision -----
    ema_decay: float = 0.0  # 0: no EMA
    save_ema: bool = True  # with EMA on: save (and return) the EMA weights, else the raw ones
    mixed_precision: str = "fp32"
    gradient_checkpointing: bool = False
    memory_mode: str = "auto"  # trainer/memory.py: auto (fit by checkpointing, then smaller batches), fit-check, off
    clip_skip: int = 1  # 1: the last CLIP layer; 2: the penultimate (CLIPSetLastLayer -2)
    deterministic: bool = False
    loss_every: int = 10  # read the loss back to Python (and check it) every N steps
    # ----- text encoders -----
    # which text encoders train too (a LoRA on them; Fine-tune: every weight): none, all, te1 (SD1's encoder / SDXL
    # CLIP-L), te2 (SDXL CLIP-G)
    text_encoders: str = "none"
    text_encoder_2_lr: float = 0.0  # SDXL CLIP-G; 0: as text_encoder_lr
    # ----- textual inversion (trainer/embeddings.py; checked there with the embedding's name) -----
    init_word: str = ""  # the new word's vectors start from this word's token embeddings
    num_vectors: int = 1  # tokens the new word takes in a prompt
    pivotal: bool = False  # pivotal tuning: a LoRA (rank, alpha, targets, at unet_lr) trains beside the embedding
    version: int = CONFIG_VERSION

    def problems(self) -> list[str]:
        """Every problem at once, each with the value and how to fix it."""
        return [*self._basic_problems(), *self._optimizer_problems(), *self._loss_problems(), *self._other_problems(),
                *self._text_encoder_problems(), *self._network_problems()]

    def _basic_problems(self) -> list[str]:
        found = []
        if self.steps < 1:
            found.append(f"steps is {self.steps}: train for at least 1 step (a few hundred is typical).")
        if not 0 < self.learning_rate <= 1:
            found.append(f"learning_rate is {self.learning_rate}: use a value in (0, 1], e.g. 1e-4.")
        if self.rank < 1:
            found.append(f"rank is {self.rank}: use a rank of at least 1 (4-32 is typical).")
        if self.alpha <= 0:
            found.append(f"alpha is {self.alpha}: use a positive alpha (often equal to the rank).")
        if self.batch_size < 1:
            found.append(f"batch_size is {self.batch_size}: use at least 1.")
        if self.resolution < 64 or self.resolution % 64:
            found.append(f"resolution is {self.resolution}: use a multiple of 64, at least 64.")
        if self.targets not in TARGET_PRESETS:
            found.append(f"targets is '{self.targets}': choose one of {', '.join(TARGET_PRESETS)}.")
        if self.save_every < 0:
            found.append(f"save_every is {self.save_every}: use 0 (only at the end) or a positive step count.")
        return found

    def _optimizer_problems(self) -> list[str]:
        found = []
        if self.optimizer not in OPTIMIZERS:
            found.append(f"optimizer is '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}.")
        if self.weight_decay < 0:
            found.append(f"weight_decay is {self.weight_decay}: use 0 or more (0.01 is AdamW's usual value).")
        for name in ("unet_lr", "text_encoder_lr"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{name} is {getattr(self, name)}: use a value in (0, 1], or 0 to use learning_rate.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            found.append(f"lr_scheduler is '{self.lr_scheduler}': choose one of {', '.join(LR_SCHEDULERS)}.")
        if not 0 <= self.lr_warmup_steps < self.steps:
            found.append(f"lr_warmup_steps is {self.lr_warmup_steps} with steps {self.steps}: use 0 or fewer warmup "
                         f"steps than steps (5-10% of them is typical).")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            found.append(f"lr_warmup_steps is {self.lr_warmup_steps} but lr_scheduler is 'constant', which has no "
                         f"warmup: choose 'constant_with_warmup' (or another schedule), or set lr_warmup_steps to 0.")
        if self.lr_scheduler_num_cycles < 1:
            found.append(f"lr_scheduler_num_cycles is {self.lr_scheduler_num_cycles}: use at least 1.")
        if self.lr_scheduler_power <= 0:
            found.append(f"lr_scheduler_power is {self.lr_scheduler_power}: use a positive power (1.0 is linear).")
        if self.optimizer == "schedule_free_adamw" and self.lr_scheduler != "constant":
            found.append(f"lr_scheduler is '{self.lr_scheduler}' with optimizer 'schedule_free_adamw', which replaces "
                         f"the schedule: set lr_scheduler to 'constant' (its warmup comes from lr_warmup_steps).")
        if self.optimizer == "schedule_free_adamw" and self.ema_decay:
            found.append(f"ema_decay is {self.ema_decay} with optimizer 'schedule_free_adamw', which already averages "
                         f"its weights: set ema_decay to 0, or pick another optimizer.")
        if self.gradient_accumulation_steps < 1:
            found.append(f"gradient_accumulation_steps is {self.gradient_accumulation_steps}: use 1 (off) or more.")
        if self.max_grad_norm < 0:
            found.append(f"max_grad_norm is {self.max_grad_norm}: use 0 (no clipping) or a positive norm, e.g. 1.0.")
        return found

    def _loss_problems(self) -> list[str]:
        found = []
        if self.min_snr_gamma < 0:
            found.append(f"min_snr_gamma is {self.min_snr_gamma}: use 0 (off) or a positive gamma (5 is typical).")
        if not 0 <= self.noise_offset <= 1:
            found.append(f"noise_offset is {self.noise_offset}: use a value in [0, 1] (0.05-0.1 is typical).")
        if self.prediction_type not in PREDICTION_TYPES:
            found.append(f"prediction_type is '{self.prediction_type}': choose one of {', '.join(PREDICTION_TYPES)}.")
        if self.timestep_bias_strategy not in TIMESTEP_BIAS_STRATEGIES:
            found.append(f"timestep_bias_strategy is '{self.timestep_bias_strategy}': choose one of "
                         f"{', '.join(TIMESTEP_BIAS_STRATEGIES)}.")
        if self.timestep_bias_strategy != "none":
            found.extend(self._timestep_bias_problems())
        if not 0 <= self.caption_dropout_rate < 1:
            found.append(f"caption_dropout_rate is {self.caption_dropout_rate}: use a value in [0, 1) "
                         f"(0.05-0.1 keeps the model usable without a prompt).")
        return found

    def _timestep_bias_problems(self) -> list[str]:
        found = []
        if self.timestep_bias_multiplier <= 0:
            found.append(f"timestep_bias_multiplier is {self.timestep_bias_multiplier}: use a positive factor "
                         f"(above 1 favours the biased timesteps, below 1 avoids them).")
        if self.timestep_bias_strategy in ("earlier", "later") and not 0 < self.timestep_bias_portion <= 1:
            found.append(f"timestep_bias_portion is {self.timestep_bias_portion}: use a fraction in (0, 1], e.g. 0.25.")
        if self.timestep_bias_strategy == "range" and not 0 <= self.timestep_bias_begin < self.timestep_bias_end <= NUM_TIMESTEPS:
            found.append(f"timestep_bias_begin/end are {self.timestep_bias_begin}/{self.timestep_bias_end}: use "
                         f"0 <= begin < end <= {NUM_TIMESTEPS}.")
        return found

    def _other_problems(self) -> list[str]:
        found = []
        if not 0 <= self.ema_decay < 1:
            found.append(f"ema_decay is {self.ema_decay}: use 0 (off) or a decay in (0, 1), e.g. 0.999.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            found.append(f"mixed_precision is '{self.mixed_precision}': choose one of {', '.join(MIXED_PRECISIONS)}.")
        if not 1 <= self.clip_skip <= 12:
            found.append(f"clip_skip is {self.clip_skip}: use 1 (the last layer) to 12; 2 is the usual anime-model value.")
        if self.loss_every < 1:
            found.append(f"loss_every is {self.loss_every}: use at least 1 (10 avoids a device sync per step).")
        if self.memory_mode not in MEMORY_MODES:
            found.append(f"memory_mode is '{self.memory_mode}': choose one of {', '.join(MEMORY_MODES)}.")
        return found

    def _network_problems(self) -> list[str]:
        found = []
        if self.network not in ALGORITHMS:
            found.append(f"network is '{self.network}': choose one of {', '.join(ALGORITHMS)}.")
        if self.conv_rank < 0:
            found.append(f"conv_rank is {self.conv_rank}: use 0 (same as rank) or a positive rank.")
        if self.conv_alpha < 0:
            found.append(f"conv_alpha is {self.conv_alpha}: use 0 (same as alpha) or a positive alpha.")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            found.append(f"lokr_factor is {self.lokr_factor}: use -1 (balanced) or a positive factor such as 8.")
        try:
            re.compile(self.target_pattern)
        except re.error as error:
            found.append(f"target_pattern '{self.target_pattern}' is not a valid regular expression ({error}): "
                         r"fix it, e.g. 'attn2\.(to_k|to_v)$', or leave it empty to use targets.")
        return found

    def network_settings(self) -> NetworkSettings:
        return NetworkSettings(self.network, self.rank, self.alpha, self.conv_rank, self.conv_alpha, self.lokr_factor)

    def _text_encoder_problems(self) -> list[str]:
        found = []
        if self.text_encoders not in TEXT_ENCODER_SETS:
            found.append(f"text_encoders is '{self.text_encoders}': choose one of {', '.join(TEXT_ENCODER_SETS)}.")
        if not 0 <= self.text_encoder_2_lr <= 1:
            found.append(f"text_encoder_2_lr is {self.text_encoder_2_lr}: use a value in (0, 1], or 0 to use text_encoder_lr.")
        return found

    def model_problems(self, model_prediction: str, family_name: str) -> list[str]:
        """Settings that contradict the loaded model (its prediction type comes from its model_sampling)."""
        found = []
        if self.prediction_type not in ("auto", model_prediction):
            found.append(f"prediction_type is '{self.prediction_type}' but the model predicts '{model_prediction}': "
                         f"set prediction_type to 'auto', or declare the model's type with ComfyUI's "
                         f"ModelSamplingDiscrete node before training.")
        if self.zero_terminal_snr and model_prediction != "v_prediction":
            found.append("zero_terminal_snr is on but the model predicts 'epsilon', which cannot learn the pure-noise "
                         "timestep (Lin et al. 2024): train a v-prediction model (ModelSamplingDiscrete v_prediction), "
                         "or turn zero_terminal_snr off.")
        if self.clip_skip > 1 and family_name == "sdxl":
            found.append(f"clip_skip is {self.clip_skip} on an SDXL model, which already uses its encoders' "
                         f"penultimate layers: set clip_skip to 1.")
        return found

    def validate(self) -> None:
        if found := self.problems():
            raise ConfigError(found)

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr or self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Read a saved config; unknown keys from newer versions are ignored, missing ones defaulted."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_toml(self) -> str:
        """The flat TOML written next to every artefact; `from_toml` reads it back."""
        return "".join(f"{key} = {_toml_value(value)}\n" for key, value in self.to_dict().items())

    @classmethod
    def from_toml(cls, text: str) -> "TrainConfig":
        return cls.from_dict(tomllib.loads(text))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)  # ints; floats as 1e-05, inf, nan: valid TOML
