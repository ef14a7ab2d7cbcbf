#!/usr/bin/env python3
"""Tiny random-weight captioner folders for TuneKit's tests, built offline (no hub access):

* ``make_wd14(folder)``: a WD14-style ONNX tagger (``model.onnx``: input [batch, 64, 64, 3] BGR 0..255, output
  sigmoid scores) and its ``selected_tags.csv``. Its scores follow the mean colour, so a red image gets the tag
  "red", a blue one "blue" (and a kaomoji, a character and rating tags to test thresholds and names).
* ``make_image_to_text(folder, kind)``: a transformers ``blip`` / ``git`` / ``blip-2`` / ``florence2`` model from a
  tiny config, a word-level tokenizer (tokenizer.json) and the ``preprocessor_config.json`` its HF processor would save.
  Its generation config suppresses the special tokens, so a caption always holds ``max_new_tokens`` words.

CLI: ``python tools/tiny_captioners.py {wd14,blip,git,blip-2,florence2} FOLDER``
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

WORDS = ["a", "photo", "of", "dog", "cat", "red", "blue", "grass", "sitting", "on", "the", "park", "sunny", "tree"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<image>"]
PAD, UNK, BOS, EOS, IMAGE = range(5)
VOCAB = {token: index for index, token in enumerate(SPECIAL + WORDS)}
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4

# (name, category, weights on the mean B, G, R in 0..1, bias): score = sigmoid(w . mean + b).
WD14_TAGS = [
    ("general", 9, (0, 0, 0), 2.0),
    ("explicit", 9, (0, 0, 0), -2.0),
    ("red", 0, (-6, -6, 12), -3.0),
    ("blue", 0, (12, -6, -6), -3.0),
    ("simple_background", 0, (0, 0, 0), 1.0),  # 0.73: above the 0.35 default threshold
    ("^_^", 0, (0, 0, 0), 3.0),
    ("faint_tag", 0, (0, 0, 0), -1.0),  # 0.27: under 0.35
    ("hatsune_miku", 4, (0, 0, 0), 1.0),  # 0.73: under the 0.85 character default
]
WD14_SIZE = 64


def make_wd14(folder: Path, size: int = WD14_SIZE, batch: int | str = "batch") -> Path:
    """`batch`: the input's batch dimension, named (any size) or fixed (some exported taggers take 1)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([tag[2] for tag in WD14_TAGS], np.float32).T / 255.0  # [3, T], on 0..255 inputs
    bias = np.array([tag[3] for tag in WD14_TAGS], np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),  # [B, 3]
        helper.make_node("MatMul", ["mean", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(WD14_TAGS)])],
        [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"), numpy_helper.from_array(weights, "weights"),
         numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with (folder / "selected_tags.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows((1000 + i, name, category, 100) for i, (name, category, _, _) in enumerate(WD14_TAGS))
    return folder


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="[BOS]", eos_token="[EOS]",
                                        extra_special_tokens={"image_token": "<image>"})
    return tokenizer


def _layers(**extra) -> dict:
    return dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, **extra)


def _vision() -> dict:
    return _layers(image_size=IMAGE_SIZE, patch_size=8)


def _ids() -> dict:
    return dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def tiny_model(kind: str):
    import transformers

    if kind == "blip":
        config = transformers.BlipConfig(
            text_config=_layers(vocab_size=len(VOCAB), max_position_embeddings=64, encoder_hidden_size=32,
                                sep_token_id=EOS, **_ids()),
            vision_config=_vision(), projection_dim=32)
        return transformers.BlipForConditionalGeneration(config)
    if kind == "git":
        config = transformers.GitConfig(vision_config=_vision(), vocab_size=len(VOCAB), max_position_embeddings=64,
                                        **_layers(), **_ids())
        return transformers.GitForCausalLM(config)
    if kind == "blip-2":
        text = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, ffn_dim=37, num_attention_heads=2,
                    word_embed_proj_dim=32, max_position_embeddings=64, **_ids())
        config = transformers.Blip2Config(
            vision_config=_vision(), qformer_config=_layers(encoder_hidden_size=32, vocab_size=len(VOCAB)),
            text_config={"model_type": "opt", **text}, num_query_tokens=NUM_QUERY_TOKENS, image_token_index=IMAGE)
        return transformers.Blip2ForConditionalGeneration(config)
    if kind == "florence2":
        vision = dict(model_type="florence_vision", depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2],
                      patch_padding=[3, 1], patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                      num_groups=[2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0)
        text = dict(model_type="bart", vocab_size=len(VOCAB), d_model=32, encoder_layers=1, decoder_layers=1,
                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                    max_position_embeddings=128, decoder_start_token_id=EOS, forced_eos_token_id=None, **_ids())
        config = transformers.Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE)
        return transformers.Florence2ForConditionalGeneration(config)
    raise ValueError(f"unknown kind {kind!r}: use blip, git, blip-2 or florence2")


# What each model's HF image processor saves: BLIP resizes to a square, GIT (CLIP's processor) resizes the
# shortest edge and centre-crops.
PREPROCESSORS = {
    "blip": {"image_processor_type": "BlipImageProcessor", "do_resize": True,
             "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True},
    "git": {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True},
}
PREPROCESSORS["blip-2"] = PREPROCESSORS["blip"]
# Florence-2: a square resize, ImageNet statistics, and how many image features the vision tower makes (17 at 32 px).
PREPROCESSORS["florence2"] = {**PREPROCESSORS["blip"], "image_processor_type": "CLIPImageProcessor",
                              "do_center_crop": False, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                              "image_seq_length": 17}


def make_image_to_text(folder: Path, kind: str, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = tiny_model(kind).eval()
    model.generation_config.suppress_tokens = list(range(len(SPECIAL)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSORS[kind], indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["wd14", "blip", "git", "blip-2", "florence2"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print(make_wd14(args.folder) if args.kind == "wd14" else make_image_to_text(args.folder, args.kind))


if __name__ == "__main__":
    main()
