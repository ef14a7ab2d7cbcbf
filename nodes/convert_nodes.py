"""Conversion nodes: thin shells over trainer.convert. Files in from ComfyUI's model lists, files out into
the models folder ComfyUI lists them from (a new name, never an overwrite)."""

import logging
from pathlib import Path

import comfy.sd
import folder_paths
from comfy_api.latest import io, ui

from ..trainer.convert.arch import ARCHS
from ..trainer.convert.checkpoint import EMA_MODES, PRECISIONS, CheckpointOptions, convert_checkpoint
from ..trainer.convert.diffusers_folder import diffusers_to_single_file, single_file_to_diffusers
from ..trainer.convert.errors import ConversionError
from ..trainer.convert.extract import ExtractOptions, extract_lora_file
from ..trainer.convert.lora_file import convert_lora_file
from ..trainer.convert.lora_keys import FORMATS
from ..trainer.convert.merge import LoraToMerge, merge_loras
from ..trainer.convert.resize import resize_lora_file
from ..trainer.files import unused_path
from .paths import checked_name

log = logging.getLogger("tunekit")
CATEGORY = "TuneKit/convert"
NONE = "none"
FORMAT_HELP = ("kohya: loads in ComfyUI, A1111/Forge, kohya tools and diffusers (the safe choice). diffusers: PEFT "
               "keys for diffusers pipelines (ComfyUI cannot load their UNet part). comfy: what ComfyUI's own "
               "trainer writes.")


def _input(kind: str, name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise(kind, name))


def _output(kind: str, filename: str) -> Path:
    """A new file in the first folder ComfyUI lists `kind` from; an existing name gets _2, _3..."""
    name = checked_name(Path(filename.strip()).name.removesuffix(".safetensors"), "filename")
    return unused_path(Path(folder_paths.get_folder_paths(kind)[0]) / f"{name}.safetensors")


def _done(path: Path, report: str, *values) -> io.NodeOutput:
    log.info("TuneKit: %s", report)
    return io.NodeOutput(*values, str(path), report, ui=ui.PreviewText(f"{report}\nSaved {path.name} in {path.parent}"))


def _outputs() -> list:
    return [io.String.Output(display_name="path"), io.String.Output(display_name="report")]


def _filename(default: str) -> io.String.Input:
    return io.String.Input("filename", default=default,
                           tooltip="Name of the new file; an existing file is kept and _2, _3... added.")


class ConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitConvertLoRA", display_name="Convert LoRA Format", category=CATEGORY, is_output_node=True,
            description="Rewrites a LoRA's keys between kohya, diffusers/PEFT and ComfyUI formats; the weights pass "
                        "through bit for bit and the metadata other UIs read is filled in. Saves into models/loras.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="The LoRA to convert."),
                io.Combo.Input("to", options=list(FORMATS), default="kohya", tooltip=FORMAT_HELP),
                io.Combo.Input("family", options=["auto", *ARCHS], default="auto",
                               tooltip="The model the LoRA is for. 'auto' reads the metadata, key names and shapes."),
                _filename("converted_lora"),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, lora_name, to, family, filename):
        path = _output("loras", filename)
        converted = convert_lora_file(_input("loras", lora_name), path, to, None if family == "auto" else family)
        return _done(path, converted.summary())


class ConvertCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitConvertCheckpoint", display_name="Convert Checkpoint", category=CATEGORY, is_output_node=True,
            description="Writes a checkpoint as .safetensors: reads .ckpt without running code in it, changes precision, "
                        "drops EMA or keeps only EMA weights, optionally bakes in a VAE. Streams tensor by tensor.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints")),
                io.Combo.Input("precision", options=["keep", *PRECISIONS], default="fp16",
                               tooltip="fp16 halves an fp32 file; bf16 keeps fp32's range; keep changes nothing."),
                io.Combo.Input("ema", options=list(EMA_MODES), default="drop",
                               tooltip="drop: remove the EMA copy (smaller); only: use the EMA weights as the model."),
                io.Combo.Input("vae_name", options=[NONE, *folder_paths.get_filename_list("vae")], default=NONE,
                               tooltip="Replace the checkpoint's VAE with this one (ldm/A1111 layout)."),
                _filename("converted_checkpoint"),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, ckpt_name, precision, ema, vae_name, filename):
        path = _output("checkpoints", filename)
        options = CheckpointOptions(precision=None if precision == "keep" else precision, ema=ema,
                                    vae=None if vae_name == NONE else _input("vae", vae_name))
        return _done(path, convert_checkpoint(_input("checkpoints", ckpt_name), path, options).summary())


class MergeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="TuneKitMergeLoRA", display_name="Merge LoRA into Checkpoint", category=CATEGORY, is_output_node=True,
            description="Bakes one or two LoRAs into a checkpoint with the same arithmetic LoraLoader uses at runtime, "
                        "saves it into models/checkpoints and loads it.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints")),
                io.Combo.Input("lora_name", options=loras),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Combo.Input("lora_name_2", options=[NONE, *loras], default=NONE, tooltip="An optional second LoRA."),
                io.Float.Input("strength_model_2", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("strength_clip_2", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Combo.Input("precision", options=["keep", *PRECISIONS], default="keep"),
                _filename("merged_checkpoint"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE"), *_outputs()],
        )

    @classmethod
    def execute(cls, ckpt_name, lora_name, strength_model, strength_clip, lora_name_2, strength_model_2,
                strength_clip_2, precision, filename):
        loras = [LoraToMerge(_input("loras", lora_name), strength_model, strength_clip)]
        if lora_name_2 != NONE:
            loras.append(LoraToMerge(_input("loras", lora_name_2), strength_model_2, strength_clip_2))
        path = _output("checkpoints", filename)
        report = merge_loras(_input("checkpoints", ckpt_name), loras, path, None if precision == "keep" else precision)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        return _done(path, report.summary(), model, clip, vae)


class ExtractLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        checkpoints = folder_paths.get_filename_list("checkpoints")
        return io.Schema(
            node_id="TuneKitExtractLoRA", display_name="Extract LoRA", category=CATEGORY, is_output_node=True,
            description="Makes a LoRA from a fine-tuned checkpoint and the base it was tuned from (SVD of each layer's "
                        "difference) and reports how much of the difference it keeps.",
            inputs=[
                io.Combo.Input("tuned_ckpt", options=checkpoints, tooltip="The fine-tuned checkpoint."),
                io.Combo.Input("base_ckpt", options=checkpoints, tooltip="The checkpoint it was tuned from."),
                io.Int.Input("rank", default=32, min=1, max=1024, tooltip="The rank, or the largest allowed with max_error."),
                io.Float.Input("max_error", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="0: use the rank. Otherwise the relative error allowed per layer (e.g. 0.05): "
                                       "each layer gets the smallest rank that meets it, up to `rank`."),
                io.Boolean.Input("conv", default=False, tooltip="Also extract the UNet's conv layers (LoCon)."),
                io.Boolean.Input("text_encoders", default=True),
                io.Combo.Input("format", options=list(FORMATS), default="kohya", tooltip=FORMAT_HELP),
                _filename("extracted_lora"),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, tuned_ckpt, base_ckpt, rank, max_error, conv, text_encoders, format, filename):
        path = _output("loras", filename)
        options = ExtractOptions(rank=rank, max_error=max_error or None, conv=conv, text_encoders=text_encoders)
        report = extract_lora_file(_input("checkpoints", tuned_ckpt), _input("checkpoints", base_ckpt), path, options, format)
        return _done(path, report.summary())


class ResizeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitResizeLoRA", display_name="Resize LoRA", category=CATEGORY, is_output_node=True,
            description="Lowers (or caps) a LoRA's rank by SVD and reports the error that costs.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Int.Input("rank", default=8, min=1, max=1024, tooltip="The new rank, or the largest allowed with max_error."),
                io.Float.Input("max_error", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="0: use the rank. Otherwise the relative error allowed per layer."),
                _filename("resized_lora"),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, lora_name, rank, max_error, filename):
        path = _output("loras", filename)
        return _done(path, resize_lora_file(_input("loras", lora_name), path, rank, max_error or None).summary())


def _diffusers_folders() -> list[str]:
    """Folders under models/diffusers that hold a pipeline (as ComfyUI's DiffusersLoader lists them)."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        base = Path(root)
        if base.is_dir():
            found += sorted(str(index.parent.relative_to(base)) for index in base.rglob("model_index.json"))
    return found


def _comfy_tokenizer() -> Path:
    import comfy.sd1_clip

    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"  # CLIP's BPE files, shipped with ComfyUI


class CheckpointToDiffusers(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitCheckpointToDiffusers", display_name="Checkpoint to Diffusers Folder", category=CATEGORY,
            is_output_node=True,
            description="Writes an SD1/SD2/SDXL checkpoint as a diffusers folder in models/diffusers, with configs read "
                        "from the weights (no download). What diffusers has no place for is kept beside it, so the "
                        "way back is exact.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints")),
                io.Combo.Input("prediction_type", options=["auto", "epsilon", "v_prediction"], default="auto",
                               tooltip="auto: v_prediction when the file says so (SDXL v_pred key, modelspec metadata). "
                                       "SD 2.x 768 models are v_prediction."),
                io.String.Input("folder_name", default="converted_pipeline",
                                tooltip="Name of the new folder; an existing one is kept and _2, _3... added."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, ckpt_name, prediction_type, folder_name):
        name = checked_name(folder_name, "folder_name")
        path = unused_path(Path(folder_paths.get_folder_paths("diffusers")[0]) / name)
        report = single_file_to_diffusers(_input("checkpoints", ckpt_name), path,
                                          None if prediction_type == "auto" else prediction_type, _comfy_tokenizer())
        return _done(path, report.summary())


class DiffusersToCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TuneKitDiffusersToCheckpoint", display_name="Diffusers Folder to Checkpoint", category=CATEGORY,
            is_output_node=True,
            description="Writes a diffusers SD1/SD2/SDXL folder (e.g. a training output) as one .safetensors "
                        "checkpoint in models/checkpoints, for ComfyUI, A1111 and Forge.",
            inputs=[io.Combo.Input("folder", options=_diffusers_folders(), tooltip="A folder in models/diffusers."),
                    _filename("converted_checkpoint")],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, folder, filename):
        source = _diffusers_path(folder)
        path = _output("checkpoints", filename)
        return _done(path, diffusers_to_single_file(source, path).summary())


def _diffusers_path(folder: str) -> Path:
    for root in folder_paths.get_folder_paths("diffusers"):
        base = Path(root).resolve()
        candidate = (base / folder).resolve()
        if candidate.is_relative_to(base) and (candidate / "model_index.json").is_file():
            return candidate
    raise ConversionError(f"No diffusers folder '{folder}' in models/diffusers: refresh the node list, or put it there.")


CONVERT_NODES = [ConvertLoRA, ConvertCheckpoint, CheckpointToDiffusers, DiffusersToCheckpoint, MergeLoRA, ExtractLoRA,
                 ResizeLoRA]
