"""The fixture checkpoints of tools/tiny_models.py work in a real ComfyUI, through its HTTP API only.

For each family: CheckpointLoaderSimple loads the file as the intended model family, with no
missing, unexpected or left-over key (the server runs with --verbose DEBUG, because ComfyUI logs
unexpected CLIP keys and left-over VAE keys only at debug level), and CLIPTextEncode, KSampler
(2 steps, 64x64), VAEDecode and VAEEncode run, with 4-channel latents at 1/8 resolution.
"""
import json
import re
import struct
import time
import uuid

import pytest

import comfy_host as harness
import tiny_models

# ComfyUI picks the text encoder and model class from the detected model config
# (comfy.supported_models SD15 / SD20 / SDXL): their "Requested to load" lines name the family.
EXPECTED_LOADS = {
    "sd15": ("SD1ClipModel", "BaseModel"),
    "sd2": ("SD2ClipModel", "BaseModel"),
    "sdxl": ("SDXLClipModel", "SDXL"),
}
# SD1 files cannot carry CLIP-L's text_projection / logit_scale (neither can SDXL's CLIP-L):
# ComfyUI itself logs their absence at debug level for every such checkpoint.
ALLOWED_DEBUG = "clip missing: ['clip_l.logit_scale', 'clip_l.transformer.text_projection.weight']"
KEY_TROUBLE = re.compile(r"(unet|clip) (missing|unexpected)|Missing VAE keys|Leftover VAE keys|left over keys|"
                         r"no match|not a checkpoint file|VAE not initalized|Had to shift TE", re.IGNORECASE)


@pytest.fixture(scope="module")
def debug_comfy(comfy_host, tmp_path_factory):
    server = harness.start_server(comfy_host, tmp_path_factory.mktemp("comfy-debug"), extra_args=["--verbose", "DEBUG"])
    yield server
    server.stop()


def _graph(ckpt: str, prefix: str, seed: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "tkdemo, a red checker pattern"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}_image"}},
        "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"{prefix}_encoded"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"{prefix}_sampled"}},
    }


def _latent(path):
    """(shape, all finite) of a .latent file, read without torch."""
    import numpy as np

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    info = json.loads(raw[8:8 + n])["latent_tensor"]
    start, end = info["data_offsets"]
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": None}[info["dtype"]]
    values = np.frombuffer(raw[8 + n + start:8 + n + end], dtype=dtype)
    return info["shape"], bool(np.isfinite(values).all())


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("family,vae", [("sd15", "taesd"), ("sd15", "kl"), ("sd2", "taesd"), ("sdxl", "taesd")])
def test_tiny_checkpoint_loads_as_its_family_and_runs(debug_comfy, family, vae, record_property):
    tag = f"tiny-{family}-{vae}-{uuid.uuid4().hex[:6]}"
    made = tiny_models.MAKERS[family](debug_comfy.models_dir / "checkpoints" / f"{tag}.safetensors", seed=1, vae=vae)
    assert f"{tag}.safetensors" in debug_comfy.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"][
        "input"]["required"]["ckpt_name"][0]

    debug_comfy.free()
    mark = debug_comfy.log_mark()
    started = time.perf_counter()
    with harness.RssSampler(debug_comfy.pid) as rss:
        history = debug_comfy.run(_graph(f"{tag}.safetensors", tag, seed=7), timeout=600)
    seconds = time.perf_counter() - started
    log = debug_comfy.log_text(mark)
    record_property("tiny_model", {"family": family, "vae": vae, "file_bytes": made["bytes"],
                                   "make_s": round(made["seconds"], 1), "params": made["params"],
                                   "load_and_sample_s": round(seconds, 1), "server_peak_rss_mb": rss.peak_bytes >> 20,
                                   "server_rss_delta_mb": rss.delta_bytes >> 20})

    trouble = [line for line in log.splitlines() if KEY_TROUBLE.search(line) and ALLOWED_DEBUG not in line]
    assert trouble == []
    te_class, model_class = EXPECTED_LOADS[family]
    assert f"Requested to load {te_class}" in log
    assert re.search(rf"Requested to load {model_class}\b", log)
    assert "model_type EPS" in log
    assert ("Requested to load TAESD" if vae == "taesd" else "Requested to load AutoencoderKL") in log

    files = debug_comfy.output_files(history)
    images = [f for f in files if f.name.startswith(f"{tag}_image")]
    assert len(images) == 1 and _png_size(images[0]) == (64, 64)
    for kind in ("sampled", "encoded"):
        (latent,) = [f for f in files if f.name.startswith(f"{tag}_{kind}")]
        assert _latent(latent) == ([1, 4, 8, 8], True), kind
    (debug_comfy.models_dir / "checkpoints" / f"{tag}.safetensors").unlink()
