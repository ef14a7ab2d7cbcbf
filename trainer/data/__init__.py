"""Training data: where images and captions come from, and how they become tensors."""

from .buckets import BucketSettings, BucketTable, make_bucket_resolutions
from .captions import CaptionOptions, process_caption
from .dataset import Augment, Dataset, SkippedImage, Subset, TrainImage
from .export import export_kohya_toml
from .folder import IMAGE_SUFFIXES, MISSING_CAPTION_POLICIES, is_legacy_layout, scan_image_folder, scan_legacy_folders
from .graph import dataset_from_pixels
from .images import ImageLoadError, load_rgb, probe_image
from .kohya_toml import read_kohya_toml
from .metadata import scan_metadata_folder
from .plan import DatasetPlan, plan_dataset
from .transforms import fit_square

__all__ = [
    "Augment",
    "BucketSettings",
    "BucketTable",
    "CaptionOptions",
    "Dataset",
    "DatasetPlan",
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "MISSING_CAPTION_POLICIES",
    "SkippedImage",
    "Subset",
    "TrainImage",
    "dataset_from_pixels",
    "export_kohya_toml",
    "fit_square",
    "is_legacy_layout",
    "load_rgb",
    "make_bucket_resolutions",
    "plan_dataset",
    "probe_image",
    "process_caption",
    "read_kohya_toml",
    "scan_image_folder",
    "scan_legacy_folders",
    "scan_metadata_folder",
]
