"""Sample & Validate in a real ComfyUI: samples through ComfyUI's sampling and the validation loss every N
steps, saved in the run folder and sent to the browser, without changing what trains."""

import asyncio
import csv
import json
import threading
import time
import uuid

import aiohttp
import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import Image

from .test_headless_train import headless
from .test_train_lora import sd15, solid_folder, train_graph  # noqa: F401  (sd15: session fixture)

PROMPTS = "tkred\na photo of tkred"


def monitor_node(validation=None, every=3, **overrides):
    inputs = {"every": every, "prompts": PROMPTS, "negative_prompt": "", "seed": 5, "steps": 2, "cfg": 1.0,
              "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64,
              "validation_count": 0, "validation_seed": 0, **overrides}
    if validation:
        inputs["validation"] = validation
    return {"class_type": "TuneKitSampleAndValidate", "inputs": inputs}


class EventListener:
    """The server's websocket messages of one client id, as the browser receives them."""

    def __init__(self, url: str):
        self.client_id, self.events, self._url = uuid.uuid4().hex, [], url.replace("http", "ws", 1)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._listen(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the websocket did not connect"

    async def _listen(self):
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{self._url}/ws?clientId={self.client_id}") as ws:
            self._ready.set()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(message.data))

    def of(self, kind: str) -> list[dict]:
        return [event["data"] for event in self.events if event.get("type") == kind]


def final_weights(run_dir):
    state = max(run_dir.glob("step_*"))
    return safetensors.torch.load_file(str(state / "lora.safetensors"))


def test_samples_and_validation_every_n_steps_leave_the_weights_unchanged(comfy, sd15):
    train_folder = solid_folder(comfy.input_dir, "e2e_monitor_train").name
    validation_folder = solid_folder(comfy.input_dir, "e2e_monitor_validation", count=2).name
    listener = EventListener(comfy.url)

    graph = train_graph(sd15, train_folder, "e2e_monitor", steps=4, learning_rate=5e-3, lora_file="e2e_monitor")
    graph["validation"] = {"class_type": "TuneKitDatasetFromFolder", "inputs": {
        "folder": validation_folder, "trigger_word": "tkred", "caption_extension": ".txt", "missing_captions": "error"}}
    graph["monitor"] = monitor_node(["validation", 0])
    graph["train"]["inputs"]["monitor"] = ["monitor", 0]
    began = time.monotonic()
    entry = comfy.wait(comfy.queue(graph, listener.client_id), timeout=600)
    monitored_seconds = time.monotonic() - began
    assert entry["status"].get("completed"), entry["status"]
    run_dir = comfy.output_dir / "tunekit" / "e2e_monitor"

    # Samples: both prompts at step 0, every 3 steps and at the last (4), saved and announced; they move as
    # the LoRA trains.
    samples = sorted((run_dir / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"step_{s:06d}_{i:02d}.png" for s in (0, 3, 4) for i in (0, 1)]
    first, last = (np.asarray(Image.open(run_dir / "samples" / f"step_{s:06d}_00.png"), dtype=np.float32) for s in (0, 4))
    change = np.abs(last - first).mean()
    print(f"\nmean |sample step 4 - sample step 0| = {change:.2f} (of 255)")
    assert first.shape == (64, 64, 3) and change > 0.5
    sent = listener.of("tunekit.sample")
    assert [event["step"] for event in sent] == [0, 3, 4]
    assert sent[-1]["images"][0] == {"filename": "step_000004_00.png", "subfolder": "tunekit/e2e_monitor/samples",
                                      "type": "output"}

    # Validation: logged, announced and in the report.
    with (run_dir / "validation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    curve = [(int(row["step"]), float(row["validation_loss"])) for row in rows]
    print("validation loss by step:", [(step, round(loss, 4)) for step, loss in curve])
    assert [step for step, _ in curve] == [0, 3, 4]
    assert curve[-1][1] < curve[0][1], "held-out images like the training ones should get easier"
    assert [(e["step"], e["loss"]) for e in listener.of("tunekit.validation")] == curve
    report = entry["outputs"]["train"]["text"][0]
    assert "validation loss (2 held-out images, fixed noise)" in report and "6 samples at steps 0, 3, 4" in report
    print(report)

    # The same run without the monitor trains bit-identical weights.
    began = time.monotonic()
    comfy.run(train_graph(sd15, train_folder, "e2e_monitor_plain", steps=4, learning_rate=5e-3, lora_file="e2e_plain"),
              timeout=600)
    plain_seconds = time.monotonic() - began
    print(f"workflow with monitor {monitored_seconds:.1f} s, without {plain_seconds:.1f} s")
    monitored, plain = final_weights(run_dir), final_weights(comfy.output_dir / "tunekit" / "e2e_monitor_plain")
    assert monitored.keys() == plain.keys()
    assert all(np.array_equal(monitored[k].numpy(), plain[k].numpy()) for k in plain), "sampling changed the training"


def test_patience_stops_at_the_first_round_without_a_new_low_and_keep_best_returns_the_lowest(comfy, comfy_host, sd15,
                                                                                              tmp_path):
    """Validation on blue images captioned with the trigger word: their loss falls, then stalls as the LoRA
    learns red (measured: lowest at step 16, higher at 18). patience 1: the run ends at the first round without
    a new low; keep_best: the LoRA Save LoRA writes is the one of the lowest round, as its state saved it. The
    run's config.toml carries the validation ([validation], validation.toml): headless, it stops at the same
    step with the same LoRA, bit for bit."""
    train_folder = solid_folder(comfy.input_dir, "e2e_best_train").name
    blue = comfy.input_dir / "e2e_best_blue"
    blue.mkdir(exist_ok=True)
    for index in range(2):
        Image.new("RGB", (64, 64), (30, 40, 220 - 10 * index)).save(blue / f"blue_{index}.png")
        (blue / f"blue_{index}.txt").write_text("tkred")
    steps, every = 40, 2
    graph = train_graph(sd15, train_folder, "e2e_best", steps=steps, learning_rate=3e-3, lora_file="e2e_best",
                        save_every=every)
    graph["validation"] = {"class_type": "TuneKitDatasetFromFolder", "inputs": {
        "folder": blue.name, "trigger_word": "", "caption_extension": ".txt", "missing_captions": "error"}}
    graph["monitor"] = monitor_node(["validation", 0], every=every, prompts="", patience=1, keep_best=True)
    graph["train"]["inputs"]["monitor"] = ["monitor", 0]
    report = comfy.run(graph, timeout=600)["outputs"]["train"]["text"][0]
    print(f"\n{report}")

    run_dir = comfy.output_dir / "tunekit" / "e2e_best"
    with (run_dir / "validation.csv").open() as handle:
        curve = [(int(row["step"]), float(row["validation_loss"])) for row in csv.DictReader(handle)]
    print(f"validation curve: {curve}")
    best = min(curve, key=lambda point: point[1])
    first_without_new_low = next(step for (step, loss), (_, before) in zip(curve[1:], curve) if loss >= before)
    assert curve[-1][0] == first_without_new_low < steps, "patience 1 ends the run at the first round without a new low"
    assert best[0] == first_without_new_low - every
    assert f"Trained {first_without_new_low} steps" in report
    assert f"the result holds the weights of step {best[0]} (lowest validation loss)" in report

    saved = safetensors.torch.load_file(str(comfy.models_dir / "loras" / "e2e_best.safetensors"))
    with safetensors.safe_open(str(comfy.models_dir / "loras" / "e2e_best.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == str(best[0])
    at_best = safetensors.torch.load_file(str(run_dir / f"step_{best[0]:06d}" / "lora.safetensors"))
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[key], at_best[key].half()) for key in saved)

    print(f"headless: {headless(comfy_host, tmp_path, run_dir / 'config.toml')}")
    retrained = safetensors.torch.load_file(str(tmp_path / "runs" / "e2e_best" / "e2e_best.safetensors"))
    assert retrained.keys() == saved.keys() and all(torch.equal(retrained[key], saved[key]) for key in saved)
    with (tmp_path / "runs" / "e2e_best" / "validation.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [step for step, _ in curve]
