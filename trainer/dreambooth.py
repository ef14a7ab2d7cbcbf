"""DreamBooth datasets: instance images under an instance prompt (rare token + class) plus class images
trained as regularization (kohya `is_reg`, weighted by `prior_loss_weight`) for prior preservation."""

from dataclasses import replace

from .data import Dataset, Subset
from .errors import ConfigError, DatasetError


def dreambooth_dataset(
    instance: Dataset,
    instance_prompt: str,
    class_images: Dataset | None,
    class_prompt: str,
    prior_preservation: bool = True,
    prior_loss_weight: float = 1.0,
) -> Dataset:
    """Instance subsets captioned with `instance_prompt` (empty: keep their captions); with prior
    preservation, class subsets as regularization captioned with `class_prompt` (empty: keep theirs)."""
    if prior_preservation and not prior_loss_weight > 0:
        raise ConfigError([f"prior_loss_weight is {prior_loss_weight}: use a positive weight (1.0 is the usual)."])
    if not len(instance):
        raise DatasetError("The instance dataset is empty: give DreamBooth at least one image of your subject.")
    subsets = [_captioned(subset, instance_prompt, is_reg=False, loss_weight=1.0) for subset in instance.subsets]
    notes = list(instance.notes)
    if prior_preservation:
        if class_images is None or not len(class_images):
            raise DatasetError(
                "Prior preservation is on but there are 0 class images: connect Class Images (count of at least 1, "
                "typically 100-200 per instance image set) or a folder of class images, or turn prior_preservation off."
            )
        subsets += [_captioned(subset, class_prompt, True, prior_loss_weight) for subset in class_images.subsets]
    elif class_images is not None and len(class_images):
        notes.append(f"prior preservation is off: the {len(class_images)} class images are not trained.")
    skipped = instance.skipped + (class_images.skipped if prior_preservation and class_images else [])
    return Dataset(subsets, skipped, notes)


def _captioned(subset: Subset, prompt: str, is_reg: bool, loss_weight: float) -> Subset:
    prompt = prompt.strip()
    images = [replace(image, caption=prompt) for image in subset.images] if prompt else subset.images
    return replace(subset, images=images, is_reg=is_reg, loss_weight=loss_weight, class_tokens=prompt or subset.class_tokens)
