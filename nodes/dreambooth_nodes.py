"""DreamBooth: class images sampled by the graph's own model through ComfyUI's sampling (cached on disk),
and the instance + class dataset with prior preservation. Thin shells over trainer.class_images/dreambooth."""

import hashlib
import logging
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..trainer.class_images import ClassImageCache, ClassImageSettings
from ..trainer.dreambooth import dreambooth_dataset
from .dataset_nodes import DatasetType

log = logging.getLogger("tunekit")
CATEGORY = "TuneKit/dataset"


def class_images_directory() -> Path:
    return Path(folder_paths.get_output_directory()) / "tunekit" / "class_images"


class ClassImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitClassImages",
            display_name="Class Images",
            category=CATEGORY,
            description="DreamBooth class (regularization) images sampled by the connected model with ComfyUI's own "
                        "sampler, cached in output/tunekit/class_images/<hash>/ with their settings: a later run with "
                        "the same model and settings reuses them and samples only the missing ones.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model you will train: class images show what it makes of the class now."),
                io.Clip.Input("clip", tooltip="Encodes the class prompt."),
                io.Vae.Input("vae", tooltip="Decodes the samples."),
                io.String.Input("class_prompt", default="a photo of a dog",
                                tooltip="The class alone, without your rare token, e.g. 'a photo of a dog'."),
                io.String.Input("negative_prompt", default="", tooltip="Negative prompt of every class image."),
                io.Int.Input("count", default=100, min=0, max=10_000,
                             tooltip="How many class images (100-200 per subject is typical). Raising it later samples only the new ones."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Image i is sampled with seed + i."),
                io.Int.Input("steps", default=25, min=1, max=10_000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="512 for SD 1.x, 1024 for SDXL."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
            ],
            outputs=[DatasetType.Output(display_name="class_images"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, class_prompt, negative_prompt, count, seed, steps, cfg, sampler_name,
                scheduler, width, height):
        positive, negative = _encode(clip, class_prompt.strip()), _encode(clip, negative_prompt.strip())
        settings = ClassImageSettings(class_prompt.strip(), negative_prompt.strip(), seed, steps, cfg, sampler_name,
                                      scheduler, width, height, sampling_identity(model, vae, positive, negative))
        cache = ClassImageCache(class_images_directory(), settings)
        missing = cache.missing(count)
        if missing:
            _sample_into(cache, missing, model, vae, positive, negative, cls.hidden.unique_id)
        report = (f"{count} class images for '{settings.prompt}': {count - len(missing)} reused, {len(missing)} "
                  f"sampled. Folder: {cache.folder}")
        log.info("TuneKit: %s", report)
        return io.NodeOutput(cache.dataset(count), report, ui=ui.PreviewText(report))


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample_into(cache: ClassImageCache, indices: list[int], model, vae, positive, negative, node_id) -> None:
    """Sample and store each missing image at once: a Cancel keeps every finished one for the next run."""
    settings = cache.settings
    progress = comfy.utils.ProgressBar(len(indices) * settings.steps, node_id=node_id)

    def step_done(*_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.update(1)

    for index in indices:
        comfy.model_management.throw_exception_if_processing_interrupted()
        latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, settings.height // 8, settings.width // 8]))
        noise = comfy.sample.prepare_noise(latent, cache.seed(index))
        samples = comfy.sample.sample(
            model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler, positive, negative,
            latent, denoise=1.0, callback=step_done, disable_pbar=True, seed=cache.seed(index),
        )
        image = vae.decode(samples)
        image = image.reshape(-1, *image.shape[-3:])[0, ..., :3]
        cache.store(index, (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def sampling_identity(model, vae, positive, negative) -> str:
    """Digest of what samples: the denoiser's and VAE's weights as loaded (their patches, e.g. LoRAs, applied)
    and the encoded prompts. The text encoder counts through its output: an SD1 checkpoint leaves CLIP's unused
    text_projection uninitialised, so its weights differ on every load."""
    conditioning = hashlib.blake2b(digest_size=16)
    for tensor in _tensors(positive) + _tensors(negative):
        _update(conditioning, "cond", tensor)
    return " ".join([_loaded_weights_digest(model), _loaded_weights_digest(vae.patcher), conditioning.hexdigest()])


def _tensors(conditioning) -> list[torch.Tensor]:
    found = []
    for tensor, extras in conditioning:
        found.append(tensor)
        found.extend(value for _, value in sorted(extras.items()) if isinstance(value, torch.Tensor))
    return found


def _update(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())


def _loaded_weights_digest(patcher) -> str:
    cached = getattr(patcher, "_tunekit_digest", None)
    if cached and cached[0] == patcher.patches_uuid:
        return cached[1]
    comfy.model_management.load_models_gpu([patcher])  # its own patches applied, nobody else's
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(patcher.model.state_dict().items()):
        _update(digest, name, tensor)
    patcher._tunekit_digest = (patcher.patches_uuid, digest.hexdigest())
    return patcher._tunekit_digest[1]


class DreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDreamBooth",
            display_name="DreamBooth",
            category=CATEGORY,
            description="Your subject's images under an instance prompt (rare token + class), plus class images trained "
                        "as regularization (prior preservation) so the class itself does not drift. Feed the result to "
                        "Fine-tune or Train LoRA.",
            inputs=[
                DatasetType.Input("instance_images", tooltip="Images of your subject (any dataset node)."),
                io.String.Input("instance_prompt", default="a photo of sks dog",
                                tooltip="Caption of every instance image: a rare token plus the class ('sks dog'). "
                                        "Empty: keep the dataset's own captions."),
                io.String.Input("class_prompt", default="a photo of a dog",
                                tooltip="Caption of every class image. Empty: keep their captions (e.g. a folder's caption files)."),
                io.Boolean.Input("prior_preservation", default=True,
                                 tooltip="Also train on the class images, so the class prompt keeps giving what the model gave before."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the class images' loss (kohya prior_loss_weight; 1.0 as in the DreamBooth paper)."),
                DatasetType.Input("class_images", optional=True,
                                  tooltip="From Class Images, or your own class folder from Dataset from Folder."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, instance_images, instance_prompt, class_prompt, prior_preservation, prior_loss_weight,
                class_images=None):
        dataset = dreambooth_dataset(instance_images, instance_prompt, class_images, class_prompt,
                                     prior_preservation, prior_loss_weight)
        return io.NodeOutput(dataset, dataset.summary())


DREAMBOOTH_NODES = [ClassImages, DreamBooth]
