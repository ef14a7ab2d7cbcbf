"""The LoRA family (LoRA, LoCon, LoHa, LoKr, DoRA): each branch starts as a no-op, its forward equals the
weight ComfyUI's loader builds from the saved tensors, it learns, round-trips, resumes and continues."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunekit.trainer.adapters import ALGORITHMS, AdapterNetwork, NetworkSettings, select_targets
from tunekit.trainer.adapters.kohya import load_lora, save_lora
from tunekit.trainer.adapters.lokr import factorization
from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.errors import ConfigError
from tunekit.trainer.events import StepDone
from tunekit.trainer.host import NullHost

from fakes import FakeBridge
from helpers import make_session

LAYERS = {
    "linear": lambda: nn.Linear(64, 48),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
}


def layer_input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (3, 5, 64) if isinstance(layer, nn.Linear) else (2, 16, 6, 6)
    return torch.randn(shape, generator=generator)


def branch_for(algorithm: str, layer: nn.Module, rank: int = 2, alpha: float = 3.0):
    network = AdapterNetwork({"lora_unet_layer": layer}, settings=NetworkSettings(algorithm, rank, alpha))
    return network, network.branches["lora_unet_layer"]


def comfy_weight(weight: torch.Tensor, saved: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight ComfyUI 0.30.0's LoraLoader builds from saved tensors (transcribed from
    comfy/weight_adapter/{lora,loha,lokr}.py calculate_weight and base.py weight_decompose)."""
    alpha = float(saved["alpha"])
    if "lora_up.weight" in saved:
        down = saved["lora_down.weight"]
        diff, scale = saved["lora_up.weight"].flatten(1) @ down.flatten(1), alpha / down.shape[0]
    elif "hada_w1_a" in saved:
        diff = (saved["hada_w1_a"] @ saved["hada_w1_b"]) * (saved["hada_w2_a"] @ saved["hada_w2_b"])
        scale = alpha / saved["hada_w1_b"].shape[0]
    else:
        w1 = saved["lokr_w1"]
        if "lokr_w2" in saved:
            w2, scale = saved["lokr_w2"], 1.0
        else:
            w2, scale = saved["lokr_w2_a"] @ saved["lokr_w2_b"], alpha / saved["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2)
    merged = weight + scale * diff.reshape(weight.shape)
    if "dora_scale" not in saved:
        return merged
    dims = [1] * (merged.dim() - 1)
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *dims).transpose(0, 1) + torch.finfo(torch.float32).eps
    return merged * (saved["dora_scale"] / norm)


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        return layer(x)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_fresh_branch_changes_nothing(algorithm, kind):
    layer = LAYERS[kind]()
    x = layer_input(layer)
    expected = layer(x)
    network, _ = branch_for(algorithm, layer)
    network.attach()
    assert torch.equal(layer(x), expected)
    network.detach()
    assert not layer._forward_hooks and not layer._forward_pre_hooks


@pytest.mark.parametrize("rank", [2, 8], ids=["low-rank", "full-lokr-w2"])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_trained_forward_equals_the_weight_comfyui_builds_from_the_saved_file(algorithm, kind, rank):
    layer = LAYERS[kind]()
    x = layer_input(layer)
    network, branch = branch_for(algorithm, layer, rank=rank)
    network.attach()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    trained = layer(x)
    network.detach()
    name = "lora_unet_layer"
    saved = {key.removeprefix(name + "."): value for key, value in network.kohya_state_dict().items()}
    reference = run_layer(layer, x, comfy_weight(layer.weight.detach(), saved))
    assert not torch.allclose(trained, layer(x), atol=1e-3), "the branch changed nothing"
    torch.testing.assert_close(trained, reference, rtol=1e-4, atol=1e-5)


def test_lokr_factorization_and_shapes_follow_lycoris():
    assert [factorization(d) for d in (127, 128, 250, 320, 1280)] == [(1, 127), (8, 16), (10, 25), (16, 20), (32, 40)]
    assert factorization(128, 4) == (4, 32) and factorization(320, 8) == (8, 40)
    _, low = branch_for("lokr", nn.Linear(64, 48), rank=2)
    assert {k: list(v.shape) for k, v in low.kohya_parameters().items()} == {
        "lokr_w1": [6, 8], "lokr_w2_a": [8, 2], "lokr_w2_b": [2, 8]}
    _, conv = branch_for("lokr", nn.Conv2d(16, 24, 3), rank=8)
    assert {k: list(v.shape) for k, v in conv.kohya_parameters().items()} == {"lokr_w1": [4, 4], "lokr_w2": [6, 4, 3, 3]}


def test_dora_magnitude_comes_from_the_weight_the_clone_trains_on():
    """A LoRA patched in by LoraLoader after the session was built is part of the base DoRA normalises."""
    layer = nn.Linear(64, 48)
    x = layer_input(layer)
    network, branch = branch_for("dora", layer)
    with torch.no_grad():
        layer.weight.add_(torch.randn(layer.weight.shape) * 0.1)  # what ComfyUI patches in at load
    expected = layer(x)
    network.attach()
    assert torch.equal(layer(x), expected)
    assert list(branch.magnitude.shape) == [1, 64]
    network.detach()


def test_locon_adds_the_res_block_layers_with_a_conv_rank_and_a_pattern_replaces_the_preset():
    res_block = {"input_blocks.1.0.in_layers.2": nn.Conv2d(8, 8, 3), "input_blocks.1.0.emb_layers.1": nn.Linear(8, 8),
                 "input_blocks.1.0.skip_connection": nn.Conv2d(8, 8, 1), "input_blocks.3.0.op": nn.Conv2d(8, 8, 3),
                 "output_blocks.2.1.conv": nn.Conv2d(8, 8, 3)}
    others = {"input_blocks.0.0": nn.Conv2d(4, 8, 3), "input_blocks.1.1.proj_in": nn.Conv2d(8, 8, 1)}
    locon = select_targets(res_block | others, "transformer", conv_layers=True)
    assert set(locon) == set(res_block) | {"input_blocks.1.1.proj_in"}
    named = {path.replace(".", "_"): module for path, module in locon.items()}
    network = AdapterNetwork(named, settings=NetworkSettings("locon", 4, 4.0, conv_rank=2, conv_alpha=1.0))
    conv, shortcut = network.branches["input_blocks_1_0_in_layers_2"], network.branches["input_blocks_1_0_skip_connection"]
    assert (conv.rank, conv.alpha, shortcut.rank, shortcut.alpha) == (2, 1.0, 4, 4.0)  # 1x1 counts as linear
    modules = FakeBridge().denoiser_modules()
    assert set(select_targets(modules, "all", pattern=r"attn2\.to_(k|v)$")) == {
        f"{block}.transformer_blocks.0.attn2.to_{p}" for block in
        ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1") for p in "kv"}


class StopAfter:
    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def emit(self, event):
        self.done += isinstance(event, StepDone)

    def should_stop(self):
        return self.done >= self.steps


# LoKr's Kronecker factors move the weight slowly at LoRA's rate: LyCORIS suggests a larger learning rate.
LEARNING_RATES = {"lokr": 3e-2}
LEARNING_RATE = 1.5e-2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_learns_resumes_exactly_and_its_file_reloads_and_continues(algorithm, tmp_path):
    settings = dict(steps=32, network=algorithm, targets="attention", learning_rate=LEARNING_RATES.get(algorithm, LEARNING_RATE))
    straight = make_session(**settings)
    straight.prepare(NullHost())
    before = straight.evaluate(draws=1)
    straight.run(NullHost())
    after = straight.evaluate(draws=1)
    print(f"{algorithm}: fixed-noise loss {before:.4f} -> {after:.4f}")
    assert after < 0.93 * before  # 0.84-0.90 over seeds 1-6 for every algorithm

    assert make_session(tmp_path / "run", **settings).run(StopAfter(8)).stopped_early
    resumed = make_session(tmp_path / "run", **settings)
    resumed.resume(latest_state_folder(tmp_path / "run"))
    resumed.run(NullHost())
    expected, actual = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)

    tensors, metadata = straight.export(algorithm)
    path = save_lora(tmp_path / f"{algorithm}.safetensors", tensors, metadata)
    loaded, loaded_metadata = load_lora(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    spec = ALGORITHMS[algorithm]
    args = json.loads(loaded_metadata["ss_network_args"])
    assert loaded_metadata["ss_network_module"] == spec.network_module
    assert args.get("algo") == spec.network_args.get("algo") and args.get("dora_wd") == spec.network_args.get("dora_wd")

    continued = make_session(**settings | dict(seed=9, init_lora=str(path)))
    fresh = {key: value.to(torch.float16) for key, value in continued.network.kohya_state_dict().items()}
    assert all(torch.equal(fresh[key], tensors[key]) for key in tensors)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    session = make_session(steps=2, network="lora", targets="transformer", rank=4, alpha=4)
    session.run(NullHost())
    return save_lora(tmp_path_factory.mktemp("init") / "kohya.safetensors", *session.export("kohya"))


@pytest.mark.parametrize("change, message", [
    (dict(rank=8, alpha=4), "set rank"),
    (dict(alpha=2), "set alpha (or conv_alpha) to 4.0"),
    (dict(network="loha"), "is a lora file, but network is 'loha': set network to 'lora' or 'locon'"),
    (dict(targets="attention"), "holds 16 layers this run does not train"),
    (dict(target_pattern=r"(transformer_blocks\.0\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
                         r"|proj_in|proj_out|time_embed\.0)$"), "lacks 1 of the 49 layers this run trains"),
])
def test_continuing_a_file_with_other_settings_says_which_to_change(lora_file, change, message):
    settings = dict(network="lora", targets="transformer", rank=4, alpha=4, init_lora=str(lora_file)) | change
    with pytest.raises(ConfigError) as error:
        make_session(**settings)
    assert message in str(error.value) and "init_lora 'kohya.safetensors'" in str(error.value)


def test_bad_network_settings_are_reported_together():
    with pytest.raises(ConfigError) as error:
        make_session(network="oft", conv_rank=-1, lokr_factor=0, target_pattern="attn[")
    text = str(error.value)
    assert all(part in text for part in ("network is 'oft'", "conv_rank is -1", "lokr_factor is 0", "target_pattern 'attn['"))
    with pytest.raises(ConfigError, match="target_pattern 'nothing_here' matches no layer"):
        make_session(target_pattern="nothing_here")
    with pytest.raises(ConfigError, match="is not a file"):
        make_session(init_lora="/nonexistent/file.safetensors")
