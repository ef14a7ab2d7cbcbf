"""Optional packages: a missing or broken one gives one message that names it and how to install it,
and no module of TuneKit imports a third-party package at load time except the few it requires."""

import ast
import sys
from pathlib import Path

import pytest

from tunekit.trainer.optional import OPTIONAL_PACKAGES, MissingPackage, available, require

REPO = Path(__file__).resolve().parents[2]
# What a module of TuneKit may import at its top level: the standard library, what requirements.txt
# lists, torch (the host's), ComfyUI's own modules and the aiohttp its server runs on (nodes/ only) and
# relative imports.
ALLOWED_AT_LOAD = set(sys.stdlib_module_names) | {
    "numpy", "PIL", "safetensors", "torch",
    "comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "node_helpers", "nodes",
    "aiohttp",
}


def top_level_imports(source: str) -> set[str]:
    """Roots imported when the module loads: module body and top-level try/if blocks, not functions."""
    found = set()
    pending = list(ast.parse(source).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.Try, ast.If, ast.With)):
            pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def test_no_module_imports_an_optional_package_at_load_time():
    sources = [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py"), *(REPO / "trainer").rglob("*.py")]
    offenders = {str(path.relative_to(REPO)): sorted(top_level_imports(path.read_text()) - ALLOWED_AT_LOAD)
                 for path in sources}
    assert len(offenders) > 20, "the walk found too few modules to mean anything"
    assert {path: mods for path, mods in offenders.items() if mods} == {}, (
        "import optional packages inside the function that needs them, through trainer.optional.require")


def test_the_walk_sees_imports_in_try_blocks_but_not_in_functions():
    source = "import os\ntry:\n    import bitsandbytes\nexcept ImportError:\n    pass\ndef f():\n    import peft\n"
    assert top_level_imports(source) == {"os", "bitsandbytes"}


def test_a_missing_package_names_itself_the_feature_and_the_install_command():
    with pytest.raises(MissingPackage) as caught:
        require("tunekit_test_no_such_package", "8-bit AdamW", pip_name="tunekit-test-pkg")
    message = str(caught.value)
    assert "8-bit AdamW needs the Python package 'tunekit-test-pkg', which is not installed" in message
    assert f"{sys.executable} -m pip install tunekit-test-pkg" in message
    assert "every other TuneKit feature works without it" in message


def test_a_package_that_fails_to_load_counts_as_missing(tmp_path, monkeypatch):
    # bitsandbytes without its CUDA libraries raises at import time with something other than ImportError.
    (tmp_path / "tunekit_test_broken.py").write_text("raise OSError('libcudart.so: cannot open shared object file')\n")
    (tmp_path / "tunekit_test_needs_dep.py").write_text("import tunekit_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingPackage, match=r"installed but failed to load \(OSError: libcudart"):
        require("tunekit_test_broken", "8-bit AdamW")
    with pytest.raises(MissingPackage, match="cannot import its dependency 'tunekit_test_absent_dependency'"):
        require("tunekit_test_needs_dep", "Captioning")
    assert not available("tunekit_test_broken")
    assert available("json") and require("json", "anything").dumps([]) == "[]"


def test_every_registered_optional_package_says_what_it_enables():
    for module, package in OPTIONAL_PACKAGES.items():
        assert package.module == module and package.pip_name and package.enables, package
