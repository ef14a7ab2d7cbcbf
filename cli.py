"""Headless entry: `python -m tunekit <command> ...` (and the `tunekit` console script).

Each command group registers its subcommands through one function in COMMANDS; errors meant for users
(TuneKitError) end the run with their message and exit code 2, nothing else.
"""

import argparse
import logging
import sys
from pathlib import Path

from .trainer.convert.arch import ARCHS
from .trainer.convert.checkpoint import EMA_MODES, PRECISIONS, CheckpointOptions, convert_checkpoint
from .trainer.convert.diffusers_folder import diffusers_to_single_file, single_file_to_diffusers
from .trainer.convert.extract import ExtractOptions, extract_lora_file
from .trainer.convert.lora_file import convert_lora_file
from .trainer.convert.lora_keys import FORMATS
from .trainer.convert.merge import LoraToMerge, merge_loras
from .trainer.convert.resize import resize_lora_file
from .trainer.convert.tensor_files import TensorSource
from .trainer.convert.unet_names import layout_from_keys
from .trainer.errors import TuneKitError
from .trainer.runfile import read_run_file

log = logging.getLogger("tunekit")


def _lora(args) -> str:
    layout = None
    if args.base:
        with TensorSource(args.base) as base:
            layout = layout_from_keys(base.specs)
    return convert_lora_file(args.input, args.output, args.to, args.family, layout, args.overwrite).summary()


def _checkpoint(args) -> str:
    options = CheckpointOptions(precision=args.precision, ema=args.ema, vae=args.vae)
    return convert_checkpoint(args.input, args.output, options, args.overwrite).summary()


def _lora_spec(text: str) -> LoraToMerge:
    """FILE, FILE:STRENGTH or FILE:STRENGTH:CLIP_STRENGTH (a Windows drive letter stays part of FILE)."""
    parts = text.rsplit(":", 2)
    numbers = []
    while len(parts) > 1 and _is_number(parts[-1]) and len(numbers) < 2:
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    return LoraToMerge(Path(path), *numbers)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _merge(args) -> str:
    return merge_loras(args.checkpoint, [_lora_spec(text) for text in args.lora], args.output, args.precision,
                       args.overwrite).summary()


def _extract(args) -> str:
    rank = args.rank if args.rank or args.max_error else 32
    options = ExtractOptions(rank=rank, max_error=args.max_error, conv=args.conv,
                             text_encoders=not args.no_text_encoders, dtype=PRECISIONS[args.precision])
    return extract_lora_file(args.tuned, args.base, args.output, options, args.to, args.overwrite).summary()


def _resize(args) -> str:
    return resize_lora_file(args.input, args.output, args.rank, args.max_error, args.to, args.family, args.overwrite).summary()


def _to_diffusers(args) -> str:
    return single_file_to_diffusers(args.input, args.output, args.prediction_type, args.tokenizer, args.overwrite).summary()


def _from_diffusers(args) -> str:
    return diffusers_to_single_file(args.input, args.output, args.overwrite).summary()


def add_convert_commands(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="convert, merge, extract or resize checkpoints and LoRAs")
    sub = convert.add_subparsers(dest="what", required=True)

    p = sub.add_parser("lora", help="LoRA between kohya, diffusers/PEFT and ComfyUI key formats")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--to", choices=FORMATS, required=True, help="target format")
    p.add_argument("--family", choices=list(ARCHS), help="model family, when the file cannot tell")
    p.add_argument("--base", type=Path, help="a checkpoint of a custom UNet, to read its layer layout from")
    p.set_defaults(run=_lora)

    p = sub.add_parser("checkpoint", help=".ckpt -> .safetensors, precision, EMA pruning, VAE bake-in")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path, help="a .safetensors file")
    p.add_argument("--precision", choices=list(PRECISIONS), help="convert floating-point tensors (default: keep)")
    p.add_argument("--ema", choices=EMA_MODES, default="keep", help="keep, drop, or keep only the EMA weights")
    p.add_argument("--vae", type=Path, help="replace the checkpoint's VAE with this one")
    p.set_defaults(run=_checkpoint)

    p = sub.add_parser("merge", help="merge LoRAs into a checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH[:CLIP_STRENGTH]]")
    p.add_argument("--precision", choices=list(PRECISIONS))
    p.set_defaults(run=_merge)

    p = sub.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint and its base (SVD)")
    p.add_argument("tuned", type=Path)
    p.add_argument("base", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--rank", type=int, default=None, help="rank (the cap when --max-error is given; default 32)")
    p.add_argument("--max-error", type=float, help="relative error per layer, e.g. 0.05: the rank follows")
    p.add_argument("--conv", action="store_true", help="also the UNet's conv layers")
    p.add_argument("--no-text-encoders", action="store_true")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp16")
    p.add_argument("--to", choices=FORMATS, default="kohya")
    p.set_defaults(run=_extract)

    p = sub.add_parser("resize", help="change a LoRA's rank by SVD")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--rank", type=int, help="new rank (the cap when --max-error is given)")
    p.add_argument("--max-error", type=float, help="relative error per layer: the rank follows")
    p.add_argument("--to", choices=FORMATS, help="output format (default: the input's)")
    p.add_argument("--family", choices=list(ARCHS))
    p.set_defaults(run=_resize)

    p = sub.add_parser("to-diffusers", help="single-file SD1/SD2/SDXL checkpoint -> diffusers folder (offline)")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path, help="the folder to create")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="default: read from the file (SDXL v_pred key, modelspec metadata), else epsilon")
    p.add_argument("--tokenizer", type=Path, help="a folder with CLIP's vocab.json and merges.txt (e.g. ComfyUI's "
                                                  "comfy/sd1_tokenizer); without it the folder has no tokenizer")
    p.set_defaults(run=_to_diffusers)

    p = sub.add_parser("from-diffusers", help="diffusers folder -> single-file checkpoint")
    p.add_argument("input", type=Path, help="the folder with model_index.json")
    p.add_argument("output", type=Path, help="a .safetensors file")
    p.set_defaults(run=_from_diffusers)

    for parser in sub.choices.values():
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _train(args) -> str:
    overrides = {"checkpoint": args.checkpoint, "dataset": args.dataset, "output_dir": args.output, "name": args.name}
    # Paths given on the command line are relative to the working directory (the file's to the file).
    run = read_run_file(args.config, {key: str(value.resolve()) if isinstance(value, Path) else value
                                      for key, value in overrides.items()})
    # The process entry point reaches the host layer here, and only here: the model is loaded and driven
    # by ComfyUI's code (nodes/headless.py), which imports `comfy` only once the run file is valid.
    from .nodes.headless import train

    return train(run, args.resume, args.comfyui, args.cpu, every=1 if args.verbose else 10)


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a LoRA headless from a run file (the config.toml Train LoRA writes)",
                            description="Re-runs a Train LoRA run (or any run file) without a ComfyUI server. Ctrl-C "
                                        "stops after the current step and keeps a resumable state.")
    p.add_argument("--config", type=Path, required=True, help="the run file: TrainConfig keys plus a [run] table")
    p.add_argument("--checkpoint", type=Path, help="overrides [run] checkpoint")
    p.add_argument("--dataset", type=Path, help="overrides [run] dataset: a folder or a kohya dataset .toml")
    p.add_argument("--output", type=Path, help="overrides [run] output_dir: the folder that gets the run folder")
    p.add_argument("--name", help="overrides [run] name")
    p.add_argument("--resume", action="store_true", help="continue the newest saved state of this run name")
    p.add_argument("--comfyui", type=Path, help="a ComfyUI folder to import ComfyUI's code from (not needed when "
                                                "this is ComfyUI's own Python)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU, as ComfyUI's --cpu")
    p.set_defaults(run=_train)


COMMANDS = [add_convert_commands, add_train_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunekit", description="TuneKit: LoRA training and conversion, headless.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        log.info(args.run(args))
    except TuneKitError as error:
        log.error("tunekit: %s", error)
        return 2
    except KeyboardInterrupt:
        log.error("tunekit: cancelled")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
