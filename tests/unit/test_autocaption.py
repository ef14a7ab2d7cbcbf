"""Auto-captioning (trainer/captions/autocaption.py) with tiny random captioners built offline
(tools/tiny_captioners.py): model-kind detection, WD14 tagging, transformers image-to-text models, batching,
caption modes, and what the report says."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tunekit.trainer.captions.autocaption import (
    AutoCaptionSettings, CaptionerError, caption_dataset, detect_captioner, load_captioner, select_tags,
    wd14_input, read_tags_csv,
)
from tunekit.trainer.data import scan_image_folder
from tunekit.trainer.optional import MissingPackage

from convert_fixtures import run_python, needs
from helpers import write_png

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import tiny_captioners  # noqa: E402

COLOURS = {"red": (230, 10, 10), "blue": (10, 10, 230), "gray": (128, 128, 128)}


@pytest.fixture(scope="module")
def wd14(tmp_path_factory):
    needs("onnxruntime")
    return tiny_captioners.make_wd14(tmp_path_factory.mktemp("captioners") / "tiny-wd14")


def colour_folder(folder, captions=None):
    folder.mkdir(exist_ok=True)
    for name, colour in COLOURS.items():
        write_png(folder / f"{name}.png", colour, size=(48, 32))
        if captions and captions.get(name) is not None:
            (folder / f"{name}.txt").write_text(captions[name])
    return scan_image_folder(folder, ".txt", "", "use trigger word")


def run(dataset, folder, **settings):
    settings = AutoCaptionSettings(**settings)
    found = detect_captioner(folder)
    batches = []
    result, report = caption_dataset(dataset, load_captioner(found, settings), settings, folder.name, found.kind,
                                     on_batch=lambda done, total: batches.append((done, total)))
    return {Path(i.source).stem: i.caption for i in result.images}, report, batches


def test_wd14_tags_follow_the_image_with_thresholds_and_readable_names(tmp_path, wd14):
    captions, report, batches = run(colour_folder(tmp_path / "d"), wd14, mode="overwrite", batch_size=2)
    assert captions == {"red": "red, ^_^, simple background", "blue": "blue, ^_^, simple background",
                        "gray": "^_^, simple background"}  # no rating tags, no faint tag, no 0.73 character
    assert batches == [(2, 3), (3, 3)]
    assert report.captioned == 3 and len(report.changes) == 3 and "Save Captions" in report.summary()
    low, _, _ = run(colour_folder(tmp_path / "d"), wd14, mode="overwrite", general_threshold=0.2,
                    character_threshold=0.7, max_length=3)
    assert low["gray"] == "hatsune miku, ^_^, simple background"  # characters first, then by score, 3 kept


def test_prefix_exclude_and_the_three_modes(tmp_path, wd14):
    dataset = colour_folder(tmp_path / "d", {"red": "my red thing", "blue": None, "gray": ""})
    only, report, _ = run(dataset, wd14, prefix="sks, photo", exclude_tags="simple_background, ^_^")
    assert only == {"red": "my red thing", "blue": "sks, photo, blue", "gray": "sks, photo"}
    assert report.captioned == 2 and report.left == 1 and "Left 1 images" in report.summary()
    over, _, _ = run(dataset, wd14, mode="overwrite", exclude_tags="^_^")
    assert over["red"] == "red, simple background"
    appended, _, _ = run(dataset, wd14, mode="append", prefix="sks", exclude_tags="^_^")
    assert appended["red"] == "sks, my red thing, red, simple background"
    assert (tmp_path / "d" / "red.txt").read_text() == "my red thing" and not (tmp_path / "d" / "blue.txt").exists()


def test_only_missing_keeps_the_dataset_trigger_word_in_front(tmp_path, wd14):
    (tmp_path / "d").mkdir()
    write_png(tmp_path / "d" / "blue.png", COLOURS["blue"])
    dataset = scan_image_folder(tmp_path / "d", ".txt", "ohwx", "use trigger word")
    settings = AutoCaptionSettings(exclude_tags="^_^")
    result, _ = caption_dataset(dataset, load_captioner(detect_captioner(wd14), settings), settings)
    assert result.images[0].caption == "ohwx, blue, simple background"


def test_a_tagger_exported_for_batches_of_one_still_takes_batches(tmp_path, wd14):
    single = tiny_captioners.make_wd14(tmp_path / "single", batch=1)
    dataset = colour_folder(tmp_path / "d")
    assert run(dataset, single, mode="overwrite", batch_size=3)[0] == run(dataset, wd14, mode="overwrite")[0]


def test_cancel_between_batches_stops_and_changes_nothing(tmp_path, wd14):
    dataset, settings = colour_folder(tmp_path / "d"), AutoCaptionSettings(mode="overwrite", batch_size=1)

    def cancel(done, total):
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        caption_dataset(dataset, load_captioner(detect_captioner(wd14), settings), settings, on_batch=cancel)
    assert [i.caption for i in dataset.images] == ["", "", ""] and not list((tmp_path / "d").glob("*.txt"))


def test_wd14_input_is_a_white_padded_bgr_square():
    pixels = wd14_input(Image.new("RGB", (20, 10), (255, 0, 0)), 20)
    assert pixels.shape == (20, 20, 3) and pixels.dtype == np.float32
    assert pixels[10, 10].tolist() == [0, 0, 255] and pixels[0, 10].tolist() == [255, 255, 255]


def test_select_tags_orders_by_score(tmp_path, wd14):
    tags = read_tags_csv(wd14 / "selected_tags.csv")
    scores = np.array([0.9, 0.9, 0.5, 0.6, 0.4, 0.1, 0.36, 0.9])
    assert select_tags(scores, tags, 0.35, 0.85) == ["hatsune miku", "blue", "red", "simple background", "faint tag"]


def test_unknown_folders_name_what_was_found_and_what_is_supported(tmp_path):
    empty = tmp_path / "mystery"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"x")
    with pytest.raises(CaptionerError, match=r"'mystery' is not a kind.*weights\.bin.*Supported: a WD14 tagger"):
        detect_captioner(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CaptionerError, match="model_type 'llava'.*blip, blip-2, git, florence2"):
        detect_captioner(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(CaptionerError, match="code shipped inside the model folder.*trust_remote_code"):
        detect_captioner(empty)
    with pytest.raises(CaptionerError, match="does not exist"):
        detect_captioner(tmp_path / "nowhere")


def test_without_onnxruntime_the_tagger_says_how_to_install_it(wd14, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingPackage, match="WD14 tagger auto-captioning needs the Python package 'onnxruntime'"):
        load_captioner(detect_captioner(wd14), AutoCaptionSettings())


def test_bad_settings_are_all_listed():
    problems = AutoCaptionSettings(mode="sometimes", general_threshold=2, batch_size=0).problems()
    assert len(problems) == 3 and "mode is 'sometimes'" in problems[0]


# The transformers models run in a fresh interpreter: the ComfyUI test host's torchvision stand-in on
# PYTHONPATH would make transformers import torchvision code (run_python drops it).
IMAGE_TO_TEXT = r"""
import gc, json, sys, types, weakref
from pathlib import Path
sys.path.insert(0, sys.argv[1])
package = types.ModuleType("tunekit"); package.__path__ = [sys.argv[2]]; sys.modules["tunekit"] = package
import numpy as np, torch, transformers
from PIL import Image
import tiny_captioners
from tunekit.trainer.captions.autocaption import (AutoCaptionSettings, PixelPreprocess, caption_dataset,
    detect_captioner, load_captioner)
from tunekit.trainer.data import scan_image_folder

root, results = Path(sys.argv[3]), {}
data = root / "images"
data.mkdir()
for index in range(3):
    Image.fromarray(np.random.default_rng(index).integers(0, 255, (40 + 8 * index, 56, 3), np.uint8)).save(data / f"{index}.png")
dataset = scan_image_folder(data, ".txt", "", "use trigger word")
images = [image.load() for image in dataset.images]
for kind in ("blip", "git", "blip-2", "florence2"):
    folder = tiny_captioners.make_image_to_text(root / f"tiny-{kind}", kind)
    found = detect_captioner(folder)
    settings = AutoCaptionSettings(mode="overwrite", max_length=4, batch_size=2, prefix="sks")
    captioner = load_captioner(found, settings)
    captioned, report = caption_dataset(dataset, captioner, settings)
    one_by_one = [captioner.caption([image])[0] for image in images]
    # The HF pipeline the folder was made for: its own image processor (PIL), generate, decode.
    processor = transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    reference = processor(images=images, return_tensors="np")["pixel_values"]
    inputs = {"pixel_values": torch.from_numpy(reference)}
    if kind == "florence2":  # the task prompt as Florence2Processor builds it
        florence = transformers.Florence2Processor(image_processor=processor, tokenizer=tokenizer)
        inputs = dict(florence(text=["<DETAILED_CAPTION>"] * len(images), images=images, return_tensors="pt"))
        results["florence_prompt_equal"] = inputs["input_ids"][0].tolist() == captioner.prompt
    model = type(captioner.model).from_pretrained(folder).eval()
    tokens = model.generate(**inputs, generation_config=captioner.generation)
    loaded = weakref.ref(captioner.model)
    captioner.close()
    del captioner
    gc.collect()
    results[kind] = dict(
        kind=found.kind, captions=[i.caption for i in captioned.images], one_by_one=one_by_one,
        hf=[" ".join(t.split()) for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)],
        pixel_error=float(np.abs(PixelPreprocess.from_folder(folder)(images) - reference).max()),
        changed=len(report.changes), summary=report.summary(), freed=loaded() is None)
print(json.dumps(results))
"""


def test_transformers_captioners_load_from_a_folder_batch_and_match_their_hf_pipeline(tmp_path):
    out = run_python(IMAGE_TO_TEXT, str(TOOLS), str(TOOLS.parent), str(tmp_path))
    results = json.loads(out.splitlines()[-1])
    assert results.pop("florence_prompt_equal") is True  # the task prompt token for token as Florence2Processor
    words = set(tiny_captioners.WORDS)
    for kind, result in results.items():
        assert result["kind"] == kind
        generated = [caption.removeprefix("sks, ") for caption in result["captions"]]
        assert all(caption.startswith("sks, ") for caption in result["captions"]), result
        assert all(len(text.split()) == 4 and set(text.split()) <= words for text in generated), result
        assert generated == result["one_by_one"] == result["hf"], (kind, result)  # batching changes nothing
        assert result["pixel_error"] < 2e-2, (kind, result["pixel_error"])  # our PIL preprocessing = HF's
        assert result["changed"] == 3
        assert result["freed"], kind  # once the captioner is dropped, nothing (no cache) holds the model
