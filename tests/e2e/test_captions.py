"""Captions end to end in a real ComfyUI: a folder dataset is auto-captioned by a tiny WD14 ONNX tagger and a
tiny GIT model from models/captioners, cleaned by caption nodes, and saved to sidecars by Save Captions, which
creates missing files, keeps existing ones unless told to overwrite, and reports it."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import comfy_host as harness  # noqa: E402
import tiny_captioners  # noqa: E402


@pytest.fixture(scope="module")
def captioners(comfy) -> dict:
    """A tiny WD14 tagger and a tiny GIT model in models/captioners (the GIT one made in a fresh interpreter:
    the host's torchvision stand-in on PYTHONPATH would confuse transformers in this process)."""
    pytest.importorskip("onnxruntime")
    root, tag = comfy.models_dir / "captioners", uuid.uuid4().hex[:6]
    wd14 = tiny_captioners.make_wd14(root / f"tk-wd14-{tag}")
    git = root / f"tk-git-{tag}"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, str(REPO / "tools" / "tiny_captioners.py"), "git", str(git)], env=env,
                   check=True, capture_output=True, timeout=300)
    junk = root / f"tk-junk-{tag}"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"\0")
    return {"wd14": wd14.name, "git": git.name, "junk": junk.name}


def caption_graph(folder: str, captioners: dict) -> dict:
    """Folder -> WD14 tagger (only missing) -> GIT (append) -> every processing node -> Save Captions."""
    def node(kind, source, **inputs):
        return {"class_type": f"TuneKit{kind}", "inputs": {"dataset": [source, 0], **inputs}}

    auto = dict(max_length=0, general_threshold=0.35, character_threshold=0.85, exclude_tags="", batch_size=2)
    return {
        "data": {"class_type": "TuneKitDatasetFromFolder", "inputs": {
            "folder": folder, "trigger_word": "", "caption_extension": ".txt", "missing_captions": "use trigger word"}},
        "tagger": node("AutoCaption", "data", **{**auto, "captioner": captioners["wd14"], "mode": "only missing",
                                                 "prefix": "sks", "exclude_tags": "^_^"}),
        "git": node("AutoCaption", "tagger", **{**auto, "captioner": captioners["git"], "mode": "append", "prefix": "",
                                                "max_length": 3}),
        "tags": node("CaptionTags", "git", remove_tags="simple_background", rename_tags="blue = azure",
                     lowercase=False, dedupe=True, order="keep", keep_first=0, seed=0),
        "replace": node("CaptionFindReplace", "tags", find=r"\bazure\b", replace="deep azure", regex=True,
                        case_sensitive=True),
        "limit": node("CaptionLimit", "replace", max_tags=2, max_characters=0),
        "trigger": node("CaptionTriggerWord", "limit", trigger_word="ohwx", action="add at end"),
        "text": node("CaptionAddText", "trigger", text="photo", position="start"),
        "save": node("SaveCaptions", "text", mode="only missing"),
    }


def text_of(history: dict, node: str) -> str:
    return " ".join(history["outputs"][node]["text"])


def test_folder_auto_captioned_processed_and_saved(comfy, captioners):
    folder = comfy.input_dir / f"e2e_captions_{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    for name, colour in {"red": (230, 10, 10), "blue": (10, 10, 230), "gray": (128, 128, 128)}.items():
        Image.new("RGB", (48, 40), colour).save(folder / f"{name}.png")
    (folder / "red.txt").write_text("my red thing")
    options = comfy.object_info("TuneKitAutoCaption")["TuneKitAutoCaption"]["input"]["required"]["captioner"]
    assert {captioners["wd14"], captioners["git"]} <= set(options[0] if isinstance(options[0], list) else options[1]["options"])

    history = comfy.run(caption_graph(folder.name, captioners), timeout=600)
    assert (folder / "blue.txt").read_text() == "photo, sks, deep azure, ohwx"
    gray = (folder / "gray.txt").read_text().split(", ")
    assert gray[:2] == ["photo", "sks"] and gray[3] == "ohwx" and len(gray) == 4, gray
    assert len(gray[2].split()) == 3 and set(gray[2].split()) <= set(tiny_captioners.WORDS), gray  # GIT's words
    assert (folder / "red.txt").read_text() == "my red thing"  # existing file kept in 'only missing'
    assert "Auto-captioned 2 images" in text_of(history, "tagger") and "Left 1 images" in text_of(history, "tagger")
    assert "Auto-captioned 3 images" in text_of(history, "git")
    report = text_of(history, "save")
    assert "2 created, 0 overwritten" in report and "Kept 1 existing caption files" in report, report
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left

    remove = {"data": caption_graph(folder.name, captioners)["data"],
              "untrigger": {"class_type": "TuneKitCaptionTriggerWord", "inputs": {
                  "dataset": ["data", 0], "trigger_word": "ohwx", "action": "remove"}},
              "save": {"class_type": "TuneKitSaveCaptions", "inputs": {"dataset": ["untrigger", 0], "mode": "overwrite"}}}
    report = text_of(comfy.run(remove, timeout=300), "save")
    assert "0 created, 2 overwritten, 1 unchanged" in report, report
    assert (folder / "blue.txt").read_text() == "photo, sks, deep azure" and (folder / "red.txt").read_text() == "my red thing"

    graph = caption_graph(folder.name, captioners)
    graph["tagger"]["inputs"]["captioner"] = captioners["junk"]
    with pytest.raises(harness.WorkflowFailed, match="is not a kind TuneKit knows.*weights.bin.*Supported"):
        comfy.run(graph, timeout=300)
