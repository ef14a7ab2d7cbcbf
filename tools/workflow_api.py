"""Turn a UI-format ComfyUI workflow (the litegraph JSON users save and load) into the API format
that ``POST /prompt`` accepts, the way the frontend's ``graphToPrompt`` does (comfyui-frontend-package
1.32.9, the one ComfyUI 0.3.75 pins: src/utils/executionUtil.ts, services/litegraphService.ts).

Stdlib only, so tests and tools can check example workflows against a live server's ``/object_info``::

    api = ui_to_api(json.load(open("example_workflows/x.json")), server.object_info())

What the frontend does and this copies:

* Widgets are made from the node definition in ``input_order`` (required, then optional) for every
  input whose type is a primitive widget (INT, FLOAT, BOOLEAN, STRING, COMBO or an option list) and
  not ``forceInput``; ``widgets_values`` fills them in that order, and widgets left without a value
  keep the definition's default.
* An INT input with ``control_after_generate`` set, or, when the definition leaves it unset, an INT
  named ``seed`` or ``noise_seed``, gets a second widget right after it ("fixed", "randomize", ...)
  that takes a ``widgets_values`` slot but is never sent to the server.
* A linked input becomes ``[origin_node_id, origin_slot]`` and wins over a widget of the same name.
  Links are followed through Reroute nodes and bypassed nodes (mode 4: the first input of a
  matching type); a PrimitiveNode's value replaces the widget it feeds.
* Notes and other frontend-only nodes, and muted nodes (mode 2), are left out; inputs linked to a
  muted node are dropped.
* A list value is sent as ``{"__value__": [...]}`` (a bare list would read as a link).

Not copied: dynamic prompts (``{a|b}`` in prompt text) and ``%node.widget%`` replacements in
filename prefixes are sent as written; group nodes, subgraphs and custom widget types of other
extensions are not expanded (a subgraph's node type is reported as unknown).
"""
from __future__ import annotations

from typing import Any

# Node types the frontend defines itself: they never appear in /object_info.
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"})
WIDGET_DEFAULTS = {"INT": 0, "FLOAT": 0, "BOOLEAN": False, "STRING": ""}
LEGACY_SEED_NAMES = ("seed", "noise_seed")
MODE_MUTED, MODE_BYPASSED = 2, 4


class UnknownNodeTypes(ValueError):
    """The workflow uses node types the server does not have (the frontend's "missing nodes" dialog)."""

    def __init__(self, types: list[str]):
        self.types = types
        super().__init__(f"node types not installed on this server: {', '.join(types)} "
                         "(install the custom nodes that provide them, or check the ComfyUI version)")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` for a UI-format workflow."""
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info} - VIRTUAL_NODE_TYPES)
    if missing:
        raise UnknownNodeTypes(missing)
    links = {link[0]: link for link in workflow.get("links") or []}  # [id, from, from_slot, to, to_slot, type]
    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        definition = object_info[node["type"]]
        inputs = widget_values(node, definition)
        for slot in node.get("inputs") or []:
            source = _resolve(nodes, links, slot.get("link"), slot.get("type", "*"), set())
            if source is not None:
                inputs[slot["name"]] = source
        title = node.get("title") or definition.get("display_name") or node["type"]
        prompt[node_id] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    for entry in prompt.values():  # like the frontend: drop links to nodes that are not sent
        entry["inputs"] = {name: value for name, value in entry["inputs"].items()
                           if not (isinstance(value, list) and value[0] not in prompt)}
    return prompt


def widget_specs(definition: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, has_control_widget) for each widget of a node definition, in order."""
    specs, groups = [], definition.get("input") or {}
    order = definition.get("input_order") or {group: list(groups.get(group) or {}) for group in groups}
    for group in ("required", "optional"):
        for name in order.get(group) or []:
            spec = (groups.get(group) or {}).get(name)
            if spec is None:
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            control = options.get("control_after_generate")
            if control is None:  # frontend: `spec.control_after_generate ?? ['seed', 'noise_seed'].includes(name)`
                control = kind == "INT" and name in LEGACY_SEED_NAMES
            specs.append((name, kind, options, bool(control)))
    return specs


def widget_values(node: dict, definition: dict) -> dict[str, Any]:
    """Map ``widgets_values`` onto the definition's widgets, skipping control_after_generate slots."""
    given = node.get("widgets_values")
    given = given if isinstance(given, list) else []  # the frontend ignores a dict here too
    values, position = {}, 0
    for name, kind, options, has_control in widget_specs(definition):
        value = given[position] if position < len(given) else _default(kind, options)
        values[name] = {"__value__": value} if isinstance(value, list) else value
        position += 2 if has_control else 1
    return values


def _default(kind: str, options: dict) -> Any:
    if kind == "COMBO":
        return options.get("default") or next(iter(options.get("options") or []), None)
    return options.get("default", WIDGET_DEFAULTS[kind])


def _resolve(nodes: dict, links: dict, link_id, want_type: str, seen: set) -> Any:
    """What an input linked by `link_id` sends: [node_id, slot], a PrimitiveNode's value, or None."""
    if link_id is None or link_id in seen:
        return None
    seen.add(link_id)
    link = links.get(link_id)
    if link is None:
        raise ValueError(f"link {link_id} is named by a node input but missing from the workflow's links")
    origin_id, origin_slot = str(link[1]), link[2]
    origin = nodes.get(origin_id)
    if origin is None:
        raise ValueError(f"link {link_id} starts at node {origin_id}, which is not in the workflow")
    origin_inputs = origin.get("inputs") or []
    if origin["type"] == "PrimitiveNode":
        return next(iter(origin.get("widgets_values") or []), None)
    if origin["type"] == "Reroute":
        return _resolve(nodes, links, origin_inputs[0].get("link") if origin_inputs else None, want_type, seen)
    if origin.get("mode", 0) == MODE_BYPASSED:
        index = _bypass_input(origin, origin_slot, want_type)
        return None if index < 0 else _resolve(nodes, links, origin_inputs[index].get("link"), want_type, seen)
    return [origin_id, origin_slot]


def _bypass_input(node: dict, slot: int, want_type: str) -> int:
    """The input a bypassed node passes on to output `slot` (ExecutableNodeDTO#getBypassSlotIndex)."""
    inputs, outputs = node.get("inputs") or [], node.get("outputs") or []
    if want_type in ("*", ""):
        return slot if len(inputs) > slot else 0
    out_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"

    def fits(index: int) -> bool:
        return _compatible(inputs[index]["type"], out_type) and _compatible(inputs[index]["type"], want_type)

    if slot < len(inputs) and fits(slot):  # prefer the input at the same index
        return slot
    exact = [i for i, candidate in enumerate(inputs) if candidate["type"] == want_type]
    return exact[0] if exact else next((i for i in range(len(inputs)) if fits(i)), -1)


def _compatible(a: str, b: str) -> bool:
    """LiteGraph.isValidConnection: '*' matches anything; 'A,B' matches either, case-insensitively."""
    if a in ("", "*") or b in ("", "*") or a == b:
        return True
    return bool({t.lower() for t in str(a).split(",")} & {t.lower() for t in str(b).split(",")})
