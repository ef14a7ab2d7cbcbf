"""Proves the harness itself: a real ComfyUI answers, runs built-in nodes and reports errors."""
import struct
import uuid

import pytest
from comfy_host import REPO, PromptRejected, WorkflowFailed

pytestmark = pytest.mark.every_host


def _save_graph(prefix: str, width: int = 64, height: int = 48) -> dict:
    """EmptyImage -> SaveImage: built-in nodes of every ComfyUI version (nodes.py)."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_server_answers_with_builtin_nodes(comfy):
    info = comfy.object_info()
    assert {"EmptyImage", "SaveImage", "KSampler"} <= info.keys()
    assert "images" in comfy.object_info("SaveImage")["SaveImage"]["input"]["required"]


def test_tunekit_is_linked_as_a_custom_node(comfy):
    link = comfy.workdir / "custom_nodes" / "ComfyUI-TuneKit"
    assert link.is_symlink() and link.resolve() == REPO
    # ComfyUI tried to import it (whether TuneKit's nodes load is for TuneKit's own tests).
    assert "custom_nodes/ComfyUI-TuneKit" in comfy.log_text()


def test_builtin_workflow_writes_an_image(comfy):
    prefix = f"smoke-{uuid.uuid4().hex[:8]}"
    history = comfy.run(_save_graph(prefix, 64, 48), timeout=60)
    files = comfy.output_files(history)
    assert len(files) == 1
    assert files[0].parent == comfy.output_dir and files[0].name.startswith(prefix)
    assert _png_size(files[0]) == (64, 48)


def test_invalid_prompt_is_rejected_with_the_servers_reason(comfy):
    graph = _save_graph("never")
    graph["1"]["inputs"]["width"] = "wide"
    with pytest.raises(PromptRejected) as caught:
        comfy.queue(graph)
    assert "EmptyImage" in str(caught.value) and caught.value.body["node_errors"]
    # 0.3.75: "... does not exist"; 0.30.0: "Node 'NoSuchNode' not found. The custom node may not be installed."
    with pytest.raises(PromptRejected, match="NoSuchNode.*(does not exist|not found)"):
        comfy.queue({"1": {"class_type": "NoSuchNode", "inputs": {}}})


def test_node_error_raises_workflow_failed(comfy):
    # SaveImage refuses a prefix that escapes the output folder: a runtime error, not a validation one.
    with pytest.raises(WorkflowFailed) as caught:
        comfy.run(_save_graph("../escape"), timeout=60)
    assert caught.value.node_type == "SaveImage"
    assert "outside the output folder" in caught.value.message


def test_interrupt_and_free_leave_the_server_usable(comfy):
    comfy.interrupt()  # nothing runs: the flag must not cancel the next prompt
    comfy.free()
    history = comfy.run(_save_graph(f"after-free-{uuid.uuid4().hex[:8]}", 8, 8), timeout=60)
    assert [path.exists() for path in comfy.output_files(history)] == [True]
