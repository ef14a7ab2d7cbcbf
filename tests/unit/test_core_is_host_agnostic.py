"""trainer/ must import nothing of ComfyUI (DESIGN.md): a host-free core runs headless too."""

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution", "node_helpers"}


def imported_roots(source: str, depth: int = 0) -> set[str]:
    """Top-level modules a file imports; relative imports that climb out of trainer/ (`depth`: the file's
    folder depth below trainer/) count by the sibling they reach, e.g. `from ..nodes import x` -> `nodes`."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > depth + 1:
            roots.add((node.module or "").split(".")[0] or "<package root>")
    return roots


def test_trainer_imports_no_host_module():
    offenders = {
        str(path.relative_to(TRAINER)): sorted(
            imported_roots(path.read_text(), len(path.relative_to(TRAINER).parts) - 1) & (HOST_MODULES | {"<package root>"}))
        for path in TRAINER.rglob("*.py")
    }
    assert len(offenders) > 10, "the walk found too few modules to mean anything"
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_check_catches_a_host_import():
    assert imported_roots("import comfy.sd\nfrom folder_paths import x") == {"comfy", "folder_paths"}
    assert imported_roots("from ..nodes.headless import train\nfrom .errors import E", depth=0) == {"nodes"}
    assert imported_roots("from ..errors import E", depth=1) == set()
