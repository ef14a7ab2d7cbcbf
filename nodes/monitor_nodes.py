"""Sample & Validate: what Train LoRA shows while it trains, so the user knows when to stop.

Samples come from the training clone itself (ComfyUI's own sampling on the MODEL clone that carries the
adapters as side branches while loaded): no export, no weight patching, no second load of the model. A
clone patched with `load_lora_for_models` would instead make ComfyUI unload the training clone (its
injection ejects), add the LoRA into every targeted weight and restore them after: a full pass over
those weights twice per sample round plus a backup copy of each, for the same images.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..trainer.data import Dataset
from ..trainer.errors import ConfigError
from ..trainer.files import atomic_write, unused_path
from ..trainer.monitor import Monitor, MonitorSettings, ValidationSet, split_validation, validation_dataset
from .dataset_nodes import DatasetType
from .sampling import SampleSettings, encode_text, sample_image

log = logging.getLogger("tunekit")
MonitorType = io.Custom("TUNEKIT_MONITOR")
SAMPLES_FOLDER = "samples"


@dataclass(frozen=True)
class MonitorRequest:
    """What the Sample & Validate node hands to Train LoRA."""

    settings: MonitorSettings
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    sampling: SampleSettings = field(default_factory=SampleSettings)
    validation: Dataset | None = None  # a separate validation set (else validation_count held out)


class SampleAndValidate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitSampleAndValidate",
            display_name="Sample & Validate Settings",
            category="TuneKit/train",
            description=(
                "Connect to Train LoRA's 'monitor' input. At step 0, every N steps and at the end it samples your "
                "prompts with the model as trained so far (shown on the Train LoRA node, saved in the run folder) "
                "and measures the loss on held-out images at fixed noise and timesteps (validation.csv): a curve "
                "that rises while the training loss falls means overfitting. 'patience' stops there; 'keep_best' "
                "returns the weights of the lowest point."
            ),
            inputs=[
                io.Int.Input("every", default=50, min=1, max=1_000_000,
                             tooltip="Sample and validate every N steps (and at step 0 and the last step). Each round "
                                     "costs about (prompts x sampling steps) model evaluations."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line (include your trigger word); empty: no samples."),
                io.String.Input("negative_prompt", default="", tooltip="Used for every sample."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="The same seed at every round, so samples differ only by what was learned."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per image."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("validation_count", default=0, min=0, max=100_000,
                             tooltip="Images of the dataset held out (not trained on) for the validation loss; 0: "
                                     "none (or connect a separate validation dataset). One in ten is typical."),
                io.Int.Input("validation_seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Chooses the held-out images and their fixed noise."),
                DatasetType.Input("validation", optional=True,
                                  tooltip="A separate validation dataset (instead of holding out validation_count images)."),
                io.Int.Input("patience", default=0, min=0, max=10_000, optional=True,
                             tooltip="Stop training once the validation loss has not reached a new low for this many "
                                     "rounds (every N steps each); the run finishes and saves as if at its last step. "
                                     "0: train every step. Needs a validation loss."),
                io.Boolean.Input("keep_best", default=False, optional=True,
                                 tooltip="Return and save the weights of the round with the lowest validation loss "
                                         "instead of the last (the saved state still resumes from the last step). "
                                         "Keeps a copy of the trained weights in RAM. Needs a validation loss."),
            ],
            outputs=[MonitorType.Output(display_name="monitor")],
        )

    @classmethod
    def execute(cls, every, prompts, negative_prompt, seed, steps, cfg, sampler_name, scheduler, width, height,
                validation_count, validation_seed, validation=None, patience=0, keep_best=False):
        if validation is not None and validation_count:
            raise ConfigError([(f"validation_count is {validation_count} and a validation dataset is connected: use "
                                f"one, set validation_count to 0 or disconnect the validation input.")])
        settings = MonitorSettings(every=every, validation_count=validation_count, validation_seed=validation_seed,
                                   patience=patience, keep_best=keep_best)
        if problems := settings.problems():
            raise ConfigError(problems)
        lines = tuple(line.strip() for line in prompts.splitlines() if line.strip())
        sampling = SampleSettings(seed, steps, cfg, sampler_name, scheduler, width, height)
        return io.NodeOutput(MonitorRequest(settings, lines, negative_prompt.strip(), sampling, validation))


def split_for(request: MonitorRequest | None, dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """(what trains, what validates)."""
    if request is None:
        return dataset, None
    if request.validation is not None:
        return dataset, validation_dataset(request.validation)
    return split_validation(dataset, request.settings.validation_count, request.settings.validation_seed)


def build_monitor(request: MonitorRequest, session, held_out: Dataset | None, vae, cache_dir: Path) -> Monitor:
    settings = request.settings
    validation = None
    if held_out is not None:
        validation = ValidationSet(session.bridge, held_out, session.config.resolution, settings.validation_seed,
                                   settings.draws, cache_dir, text_trains=session.feed.text_trains)
        validation.prepare()
    sampler = RunSampler(session.bridge, vae, request, session.run_dir / SAMPLES_FOLDER) if request.prompts else None
    return Monitor(settings, validation, sampler, session.run_dir)


class RunSampler:
    """The monitor's sampler: each prompt with the model as trained so far, saved as PNGs."""

    def __init__(self, bridge, vae, request: MonitorRequest, folder: Path):
        self.bridge, self.vae, self.request, self.folder = bridge, vae, request, folder
        self._frozen_conditioning = None  # (negative, positives) of the graph's CLIP, encoded once

    def __call__(self, step: int) -> list[Path]:
        model, clip = self.bridge.sampling_models()
        negative, positives = self._conditioning(clip)
        paths = []
        for index, (prompt, positive) in enumerate(zip(self.request.prompts, positives)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            settings = self.request.sampling
            pixels = sample_image(model, self.vae, positive, negative, settings, settings.seed)
            paths.append(self._save(pixels, step, index, prompt))
        log.info("TuneKit sampled %d prompts at step %d", len(paths), step)
        # Decoding may have made ComfyUI unload the training clone where memory is short: load it back
        # (its injection re-attaches the adapters) before the next step trains.
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        return paths

    def _conditioning(self, clip):
        """The prompts encoded by the CLIP that samples: once for the graph's frozen CLIP (an encode can cost
        more than a sample, e.g. fp16 weights on a CPU), every round for a text encoder in training."""
        if clip is self.bridge.clip and self._frozen_conditioning is not None:
            return self._frozen_conditioning
        encoded = encode_text(clip, self.request.negative_prompt), [encode_text(clip, p) for p in self.request.prompts]
        if clip is self.bridge.clip:
            self._frozen_conditioning = encoded
        return encoded

    def _save(self, pixels, step: int, index: int, prompt: str) -> Path:
        info = PngInfo()
        info.add_text("tunekit", f"step {step}; prompt {prompt}; {self.request.sampling}")
        path = unused_path(self.folder / f"step_{step:06d}_{index:02d}.png")
        atomic_write(path, lambda temp: Image.fromarray(pixels).save(temp, format="PNG", pnginfo=info))
        return path

