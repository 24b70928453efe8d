"""UI-format workflows: a small builder that writes what the ComfyUI frontend opens, and the
UI -> API conversion the frontend does when it queues a prompt (used by the end-to-end tests).

Both need the server's ``/object_info`` to know which inputs are widgets and in which order the
frontend stores their values (``widgets_values``).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: they never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}


class WorkflowError(ValueError):
    pass


def _input_specs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of every input in the order the frontend lays them out."""
    specs = []
    order = info.get("input_order")
    for section in ("required", "optional"):
        group = info.get("input", {}).get(section, {}) or {}
        names = order.get(section, list(group)) if order else list(group)
        for name in names:
            spec = group[name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, typ, opts))
    return specs


def _is_widget(typ, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _extra_widget_values(name: str, typ, opts: dict) -> list:
    """Values of the widgets the frontend adds after an input's own (seed control, upload button)."""
    extra = []
    if opts.get("control_after_generate"):
        extra.append("fixed")
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        extra.append("image")
    return extra


class Output:
    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, wf: "Workflow", node_id: int, class_type: str, values: dict, title: str | None):
        self.wf, self.id, self.class_type, self.values, self.title = wf, node_id, class_type, values, title

    def __getitem__(self, slot: int) -> Output:
        return Output(self, slot)


class Workflow:
    """Build a workflow in Python; write it as UI JSON (``to_ui``) or API JSON (``to_api``)."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[Node] = []

    def add(self, class_type: str, title: str | None = None, **inputs) -> Node:
        if class_type not in self.info:
            raise WorkflowError(f"unknown node type {class_type!r}")
        known = {name for name, _, _ in _input_specs(self.info[class_type])}
        unknown = set(inputs) - known
        if unknown:
            raise WorkflowError(f"{class_type} has no inputs {sorted(unknown)} (has {sorted(known)})")
        node = Node(self, len(self.nodes) + 1, class_type, inputs, title)
        self.nodes.append(node)
        return node

    def to_api(self) -> dict:
        # Through the UI form, so defaults and widget order are resolved exactly as for a saved file.
        return ui_to_api(self.to_ui(), self.info)

    def to_ui(self) -> dict:
        links = []
        out_links: dict[tuple[int, int], list[int]] = defaultdict(list)
        depth: dict[int, int] = {}
        for n in self.nodes:
            d = 0
            for v in n.values.values():
                if isinstance(v, Output):
                    d = max(d, depth[v.node.id] + 1)
            depth[n.id] = d
        rows: dict[int, int] = defaultdict(int)
        ui_nodes = []
        for order, n in enumerate(self.nodes):
            info = self.info[n.class_type]
            inputs, widgets = [], []
            for name, typ, opts in _input_specs(info):
                val = n.values.get(name)
                if _is_widget(typ, opts):
                    if isinstance(val, Output):
                        raise WorkflowError(f"{n.class_type}.{name}: linking widget inputs is not supported")
                    if val is None:
                        val = opts.get("default")
                        if val is None and isinstance(typ, list):
                            val = typ[0] if typ else None
                        if val is None and typ == "COMBO":
                            val = (opts.get("options") or [None])[0]
                    widgets.append(val)
                    widgets.extend(_extra_widget_values(name, typ, opts))
                else:
                    link_id = None
                    if isinstance(val, Output):
                        link_id = len(links) + 1
                        src = val.node
                        src_type = self.info[src.class_type]["output"][val.slot]
                        links.append([link_id, src.id, val.slot, n.id, len(inputs), src_type])
                        out_links[(src.id, val.slot)].append(link_id)
                    elif val is not None:
                        raise WorkflowError(f"{n.class_type}.{name} must be linked, got {val!r}")
                    inputs.append({"name": name, "type": typ if isinstance(typ, str) else "COMBO",
                                   "link": link_id})
            outputs = []
            for slot, (typ, oname) in enumerate(zip(info.get("output", []), info.get("output_name", []))):
                outputs.append({"name": oname, "type": typ, "links": None, "slot_index": slot})
            col, row = depth[n.id], rows[depth[n.id]]
            rows[col] += 1
            node = {
                "id": n.id, "type": n.class_type, "pos": [40 + 360 * col, 40 + 300 * row],
                "size": [320, 120 + 26 * len(widgets)], "flags": {}, "order": order, "mode": 0,
                "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": n.class_type}, "widgets_values": widgets,
            }
            if n.title:
                node["title"] = n.title
            ui_nodes.append(node)
        for node in ui_nodes:
            for out in node["outputs"]:
                ids = out_links.get((node["id"], out["slot_index"]))
                out["links"] = ids or []
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
        }

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_ui(), indent=1) + "\n")
        return path


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API prompt the frontend would queue.

    Raises WorkflowError for a node type the server does not know (the frontend's "missing
    nodes" case), so a workflow referencing a nonexistent node fails loudly.
    """
    links = {l[0]: l for l in ui.get("links", [])}
    prompt = {}
    for node in ui["nodes"]:
        typ = node["type"]
        if typ in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if typ not in object_info:
            raise WorkflowError(f"node {node['id']}: type {typ!r} is not installed on this server")
        info = object_info[typ]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise WorkflowError(f"node {node['id']}: dict widgets_values are not supported")
        ins = {}
        pos = 0
        for name, t, opts in _input_specs(info):
            if _is_widget(t, opts):
                if pos < len(values):
                    ins[name] = values[pos]
                pos += 1 + len(_extra_widget_values(name, t, opts))
            if name in linked:
                link = links[linked[name]]
                ins[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": typ, "inputs": ins}
    return prompt


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --- shortened runs (CPU with random weights) ------------------------------------------------------
CPU_STEPS = 4  # sampling steps of a shortened run
CPU_SIZE = 128  # pixels: the width of generated latents and of every loaded image in a shortened run
STEP_INPUTS = ("steps", "inversion_steps")  # capped to CPU_STEPS (same cap keeps sampler and inversion equal)
# Every widget a shortened run caps, by name: the step counts, and the segmenter's training (10
# classifiers of up to 100 epochs take 10+ minutes of CPU at 128 px; 3 of 8 epochs still vote).
CPU_CAPS = {**{key: CPU_STEPS for key in STEP_INPUTS}, "ensemble_size": 3, "max_epochs": 8}
SIZE_NODES = {"EmptyLatentImage": ("width", "height")}


def shorten(prompt: dict, steps: int = CPU_STEPS, size: int = CPU_SIZE) -> list[str]:
    """Shorten an API prompt in place for a CPU run with random weights; return what changed, in words.

    Caps every ``steps``/``inversion_steps`` input at ``steps`` (and the other ``CPU_CAPS``: the
    segmenter's classifiers and epochs), every generated latent at ``size``
    pixels, and scales every loaded image to ``size`` pixels wide (core ``ImageScale``, aspect kept)
    before anything uses it. The shipped workflow files are not touched: they keep the user's settings.
    """
    changes = []
    for nid, node in list(prompt.items()):
        ins = node["inputs"]
        for key, cap in CPU_CAPS.items():
            cap = steps if key in STEP_INPUTS else cap
            v = ins.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                ins[key] = cap
                changes.append(f"{node['class_type']} #{nid}: {key} {v} -> {cap}")
        for key in SIZE_NODES.get(node["class_type"], ()):
            v = ins.get(key)
            if isinstance(v, int) and v > size:
                ins[key] = size
                changes.append(f"{node['class_type']} #{nid}: {key} {v} -> {size}")
    next_id = max((int(k) for k in prompt if k.isdigit()), default=0) + 1
    for nid, node in list(prompt.items()):
        if node["class_type"] != "LoadImage":
            continue
        scale_id = str(next_id)
        next_id += 1
        for other in prompt.values():
            for key, v in other["inputs"].items():
                if isinstance(v, list) and len(v) == 2 and v[0] == nid and v[1] == 0:
                    other["inputs"][key] = [scale_id, 0]
        prompt[scale_id] = {"class_type": "ImageScale",
                            "inputs": {"image": [nid, 0], "upscale_method": "area", "width": size,
                                       "height": 0, "crop": "disabled"}}
        changes.append(f"LoadImage #{nid} ({node['inputs'].get('image')}): scaled to {size} px wide")
    return changes
