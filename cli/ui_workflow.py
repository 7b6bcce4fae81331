"""UI-format workflows (the JSON ComfyUI's editor saves) -> API-format prompts (what the executor runs).

Why: the runner accepts both formats, but only the API format can be executed. The editor's format
keeps widget values as a positional ``widgets_values`` list, links in a separate table, and
front-end-only nodes (notes, reroutes, primitive nodes, KJNodes' virtual Set/Get wires) that the
executor does not know. Converting needs nothing but each node class's ``INPUT_TYPES``, so this
module is pure and is tested with fake node classes.

Rules (the editor's own):

- widgets are the inputs whose type is INT/FLOAT/STRING/BOOLEAN/COMBO (or a list of choices), in
  ``INPUT_TYPES`` order, unless declared ``forceInput``; a seed-like widget is followed by its
  "control after generate" value (``fixed``/``randomize``/..., a bool in very old files), which is
  skipped; widgets without a stored value take their declared default;
- a linked input (a socket, or a widget converted to one) takes the link, which is followed through
  reroutes, Set/Get pairs and bypassed nodes; a primitive node's value is inlined;
- notes, muted nodes and groups are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LikenessError

NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPES = frozenset({"Reroute"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})
SET_GET_TYPES = frozenset({"SetNode", "GetNode"})  # KJNodes' virtual "Set/Get" wires
FRONTEND_ONLY_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES | SET_GET_TYPES
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})
MODE_MUTED, MODE_BYPASSED = 2, 4
MAX_LINK_HOPS = 100  # a reroute/bypass chain longer than this is a cycle in a broken file

UNCONNECTED = object()  # what an input resolves to when nothing real feeds it


class WorkflowFormatError(LikenessError):
    """The workflow cannot be converted: not a workflow, uses subgraphs, or a node type is not installed."""


def node_id_key(node_id: Any) -> tuple:
    """Sort key for node ids: numbers in numeric order, then other ids as text."""
    text = str(node_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def is_api_format(workflow: dict) -> bool:
    """True for ``{node id: {"class_type": ..., "inputs": ...}}``."""
    return bool(workflow) and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def is_ui_format(workflow: dict) -> bool:
    return "nodes" in workflow and "links" in workflow


# --------------------------------------------------------------------------------------------------
# Widgets


@dataclass(frozen=True)
class Widget:
    """An input the editor shows as a widget (so it has a slot in ``widgets_values``)."""
    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN or COMBO
    options: dict = field(default_factory=dict)
    choices: tuple = ()  # a combo's options when declared as a list

    @property
    def has_seed_control(self) -> bool:
        """The editor adds a "control after generate" value after this widget."""
        return bool(self.options.get("control_after_generate")) or (
            self.kind == "INT" and self.name in SEED_INPUT_NAMES)

    @property
    def default(self) -> Any:
        """The declared default; a combo without one shows its first choice; else None."""
        if "default" in self.options:
            return self.options["default"]
        return self.choices[0] if self.choices else None


def _input_entries(cls) -> list[tuple[str, Any]]:
    spec = cls.INPUT_TYPES()
    return [item for section in ("required", "optional") for item in (spec.get(section) or {}).items()]


def _widget_from_entry(name: str, entry: Any) -> Widget | None:
    """The widget for one ``INPUT_TYPES`` entry, or None for a socket (typed input or ``forceInput``)."""
    is_sequence = isinstance(entry, (list, tuple))
    kind = entry[0] if is_sequence and entry else entry
    options = entry[1] if is_sequence and len(entry) > 1 and isinstance(entry[1], dict) else {}
    choices = tuple(kind) if isinstance(kind, (list, tuple)) else ()
    is_combo = isinstance(kind, (list, tuple)) or kind == "COMBO"
    if options.get("forceInput") or not (is_combo or kind in WIDGET_TYPES):
        return None
    return Widget(name, "COMBO" if is_combo else kind, options, choices)


def widget_inputs(cls) -> list[Widget]:
    """The node class's widgets in the order the editor stores their values."""
    widgets = (_widget_from_entry(name, entry) for name, entry in _input_entries(cls))
    return [w for w in widgets if w is not None]


def _is_control_value(value: Any, seed_like: bool) -> bool:
    """The editor's "control after generate" value (old workflows stored a bool for seed widgets)."""
    if isinstance(value, str):
        return value in SEED_CONTROL_VALUES
    return seed_like and isinstance(value, bool)


def _is_control_value_of(widget: Widget, following: Widget | None, value: Any) -> bool:
    """True when ``value`` (stored right after ``widget``'s) is ``widget``'s control value."""
    seed_like = widget.has_seed_control
    if not _is_control_value(value, seed_like):
        return False
    # A generic INT followed by a combo that offers this very value: the value is the combo's.
    return seed_like or following is None or value not in following.choices


def _map_widget_list(widgets: list[Widget], values: list) -> dict:
    mapped: dict = {}
    index = 0
    for position, widget in enumerate(widgets):
        if index >= len(values):
            break
        mapped[widget.name] = values[index]
        index += 1
        following = widgets[position + 1] if position + 1 < len(widgets) else None
        if index < len(values) and _is_control_value_of(widget, following, values[index]):
            index += 1
    return mapped


def map_widget_values(cls, values: Any) -> dict:
    """Widget input values from a UI node's ``widgets_values`` (a list in widget order, or a dict).

    Widgets without a stored value take their declared default (old files omit e.g. SaveImage's
    ``filename_prefix``). The "control after generate" value after seed widgets is skipped.
    """
    widgets = widget_inputs(cls)
    if isinstance(values, dict):
        mapped = {w.name: values[w.name] for w in widgets if w.name in values}
    else:
        mapped = _map_widget_list(widgets, list(values or []))
    for widget in widgets:
        if widget.name not in mapped and widget.default is not None:
            mapped[widget.name] = widget.default
    return mapped


# --------------------------------------------------------------------------------------------------
# Links


def links_by_id(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot); links are lists or (newer schema) dicts."""
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = (link[1], link[2])
    return links


def _input_link(node: dict, slot: int | None = None, type_name: str | None = None):
    """The link into input ``slot``, else into the first linked input of ``type_name`` (or any)."""
    inputs = node.get("inputs", []) or []
    if slot is not None and slot < len(inputs):
        return inputs[slot].get("link")
    for item in inputs:
        if item.get("link") is not None and (type_name is None or item.get("type") in (type_name, "*")):
            return item.get("link")
    return None


def _bypassed_input_link(node: dict, slot: int):
    """The link a bypassed node passes to output ``slot``: the same-slot input of the output's type,
    else the first linked input of that type (the executor's bypass rule)."""
    outputs = node.get("outputs", []) or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else None
    inputs = node.get("inputs", []) or []
    same_slot = inputs[slot] if slot < len(inputs) else None
    if same_slot and same_slot.get("link") is not None and same_slot.get("type") == out_type:
        return same_slot["link"]
    return _input_link(node, type_name=out_type)


class LinkResolver:
    """Follows a link through pass-through nodes to the real node output (or inlined value) feeding it."""

    def __init__(self, workflow: dict):
        self.nodes = {n["id"]: n for n in workflow.get("nodes", []) or []}
        self.links = links_by_id(workflow)
        self.setters = {n["widgets_values"][0]: n for n in self.nodes.values()
                        if n.get("type") == "SetNode" and n.get("widgets_values")}

    def resolve(self, link_id, hops: int = 0) -> Any:
        """``[origin id, slot]``, a primitive node's value, or :data:`UNCONNECTED`."""
        if link_id is None or link_id not in self.links or hops > MAX_LINK_HOPS:
            return UNCONNECTED
        origin_id, origin_slot = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            return UNCONNECTED
        kind = origin.get("type")
        if kind in PRIMITIVE_TYPES:
            values = origin.get("widgets_values") or []
            return values[0] if values else UNCONNECTED
        if kind in REROUTE_TYPES | SET_GET_TYPES or origin.get("mode") == MODE_BYPASSED:
            return self.resolve(self._forwarded_link(origin, origin_slot), hops + 1)
        if origin.get("mode") == MODE_MUTED:
            return UNCONNECTED
        return [str(origin_id), origin_slot]

    def _forwarded_link(self, node: dict, slot: int):
        """The input link a pass-through node forwards to its output ``slot``."""
        kind = node.get("type")
        if kind == "GetNode":
            setter = self.setters.get((node.get("widgets_values") or [None])[0])
            return _input_link(setter, 0) if setter else None
        if kind in REROUTE_TYPES or kind == "SetNode":
            return _input_link(node, 0)
        return _bypassed_input_link(node, slot)


# --------------------------------------------------------------------------------------------------
# Conversion


def _api_node(node_id, node: dict, node_classes: dict, resolver: LinkResolver) -> dict:
    kind = node.get("type")
    cls = node_classes.get(kind)
    if cls is None:
        raise WorkflowFormatError(
            f"The workflow uses node type '{kind}' (node #{node_id}), which is not installed: add the custom "
            f"node package that provides it to ComfyUI's custom_nodes (or pass --extra-nodes).")
    inputs = map_widget_values(cls, node.get("widgets_values"))
    for item in node.get("inputs", []) or []:
        value = resolver.resolve(item.get("link"))
        if value is not UNCONNECTED:
            inputs[item["name"]] = value
    title = node.get("title") or getattr(cls, "DISPLAY_NAME", None) or kind
    return {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}


def ui_to_api(workflow: dict, node_classes: dict, skip_unknown: bool = False) -> dict:
    """Convert the editor's workflow JSON to an API prompt (``node_classes``: type name -> node class).

    ``skip_unknown`` leaves out nodes whose type is not in ``node_classes`` instead of refusing the file
    (for readers that only need some node types, e.g. ``models verify --for``)."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowFormatError("this UI workflow uses subgraphs, which the runner does not convert; export it "
                                  "with 'Export (API)' in ComfyUI and run that file.")
    resolver = LinkResolver(workflow)
    prompt = {}
    for node_id, node in sorted(resolver.nodes.items(), key=lambda item: node_id_key(item[0])):
        if node.get("type") in FRONTEND_ONLY_TYPES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        if skip_unknown and node.get("type") not in node_classes:
            continue
        prompt[str(node_id)] = _api_node(node_id, node, node_classes, resolver)
    return prompt
