"""Writes ``locales/zh/nodeDefs.json`` and ``locales/zh/main.json`` from the nodes' live schemas and
the Chinese texts in ``tools/node_docs/locales_zh.py``: ``.venv/bin/python -m tools.node_docs.locales``.

The files follow ComfyUI's i18n for custom nodes (ComfyUI 0.3.75 ``app/custom_node_manager.py``
serves ``custom_nodes/<pack>/locales/<lang>/main.json``, with ``nodeDefs.json`` merged in under
``nodeDefs``, at ``GET /i18n``; the frontend reads ``nodeDefs.<NodeId>.display_name`` /
``.description`` / ``.inputs.<input id>.name`` / ``.tooltip`` / ``.outputs.<index>.name`` /
``.tooltip``, and ``nodeCategories.<segment>`` for each segment of a category path). The help page
of a node in Chinese is ``js/docs/<NodeId>/zh.md`` (the frontend asks for ``docs/<NodeId>/<locale>.md``
first, then ``docs/<NodeId>.md``).

Exits 1, writing nothing, when a node, input, output or category of the live schemas has no Chinese
text; it lists what is missing. It also writes each node's Chinese help page from the same texts.
"""
from __future__ import annotations

import json
import logging
import sys

from tools.harness.host import REPO

log = logging.getLogger("plugkit.locales")

LANG = "zh"
LOCALES = REPO / "locales" / LANG


def live_node_infos() -> list[dict]:
    """``GET_NODE_INFO_V1()`` of every node the pack registers (what /object_info serves)."""
    from tools.harness.host import setup_in_process

    setup_in_process()
    from plugkit.nodes.extension import all_nodes

    return [n.GET_NODE_INFO_V1() for n in all_nodes()]


def _inputs(info: dict) -> list[str]:
    return [name for section in ("required", "optional") for name in (info["input"].get(section) or {})]


def help_page(node_id: str):
    return REPO / "js" / "docs" / node_id / f"{LANG}.md"


def missing(infos: list[dict], texts: dict | None = None, categories: dict | None = None) -> list[str]:
    """Every text the live schemas need and the source mapping lacks (empty: complete)."""
    from tools.node_docs import locales_zh

    texts = locales_zh.NODES if texts is None else texts
    categories = locales_zh.CATEGORIES if categories is None else categories
    out = []
    for info in infos:
        nid = info["name"]
        entry = texts.get(nid)
        if entry is None:
            out.append(f"{nid}: no entry in tools/node_docs/locales_zh.py NODES")
            continue
        for key in ("display_name", "description"):
            if not str(entry.get(key, "")).strip():
                out.append(f"{nid}: no {key}")
        for name in _inputs(info):
            pair = entry.get("inputs", {}).get(name)
            if not pair or not all(str(p).strip() for p in pair):
                out.append(f"{nid}: input {name!r} has no Chinese name and tooltip")
        extra = set(entry.get("inputs", {})) - set(_inputs(info))
        if extra:
            out.append(f"{nid}: texts for inputs the node no longer has: {sorted(extra)}")
        outs = entry.get("outputs", [])
        if len(outs) != len(info["output"]) or not all(all(str(p).strip() for p in o) for o in outs):
            out.append(f"{nid}: needs {len(info['output'])} output (name, tooltip) pairs, has {len(outs)}")
        for seg in info["category"].split("/"):
            if not str(categories.get(seg, "")).strip():
                out.append(f"{nid}: category segment {seg!r} has no Chinese name")
        if not locales_zh.NOTES.get(nid):
            out.append(f"{nid}: no notes for its Chinese help page (NOTES)")
    return sorted(set(out))


def build(infos: list[dict]) -> tuple[dict, dict]:
    """(nodeDefs.json, main.json) contents for the live nodes."""
    from tools.node_docs import locales_zh

    node_defs = {}
    cats = set()
    for info in sorted(infos, key=lambda i: i["name"]):
        nid = info["name"]
        entry = locales_zh.NODES[nid]
        node_defs[nid] = {
            "display_name": entry["display_name"],
            "description": entry["description"],
            "inputs": {name: {"name": entry["inputs"][name][0], "tooltip": entry["inputs"][name][1]}
                       for name in _inputs(info)},
            "outputs": {str(i): {"name": n, "tooltip": t} for i, (n, t) in enumerate(entry["outputs"])},
        }
        cats.update(info["category"].split("/"))
    main = {"nodeCategories": {c: locales_zh.CATEGORIES[c] for c in sorted(cats)}}
    return node_defs, main


def _cell(v) -> str:
    """Plain text for a markdown line: one line, literal * and |."""
    return str(v).replace("\n", " ").replace("*", "\\*").replace("|", "\\|")


def help_page_text(info: dict) -> str:
    """The Chinese help page of one node, from its live schema and the texts in tools/node_docs/locales_zh.py."""
    from tools.node_docs import locales_zh

    nid = info["name"]
    entry = locales_zh.NODES[nid]
    # Lists, not tables: the help panel is a narrow sidebar.
    lines = [f"# {entry['display_name']}", "", entry["description"], "", "## 输入", ""]
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            typ = spec[0] if isinstance(spec[0], str) else "COMBO"
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            default = opts.get("default")
            shown = "" if default is None else f"，默认 `{default}`" if default != "" else "，默认为空"
            opt = "，可选" if section == "optional" else ""
            zh_name, tip = entry["inputs"][name]
            lines.append(f"- **`{name}`**（{_cell(zh_name)}，{typ}{shown}{opt}）：{_cell(tip)}")
    lines += ["", "## 输出", ""]
    for (typ, oname), (zh_name, tip) in zip(zip(info["output"], info["output_name"]), entry["outputs"]):
        lines.append(f"- **`{oname}`**（{_cell(zh_name)}，{typ}）：{_cell(tip)}")
    notes = locales_zh.NOTES.get(nid, [])
    if notes:
        lines += ["", "## 说明", ""] + [f"- {n}" for n in notes]
    lines += ["", f"English: [{nid}.md](../{nid}.md)"]
    return "\n".join(lines) + "\n"


def dump(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    infos = live_node_infos()
    gaps = missing(infos)
    if gaps:
        log.error("Chinese texts missing (add them to tools/node_docs/locales_zh.py or js/docs/<NodeId>/zh.md):\n  %s",
                  "\n  ".join(gaps))
        return 1
    node_defs, main_json = build(infos)
    LOCALES.mkdir(parents=True, exist_ok=True)
    (LOCALES / "nodeDefs.json").write_text(dump(node_defs), encoding="utf-8")
    (LOCALES / "main.json").write_text(dump(main_json), encoding="utf-8")
    for info in infos:
        page = help_page(info["name"])
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(help_page_text(info), encoding="utf-8")
    log.info("wrote %s and %s (%d nodes)", (LOCALES / "nodeDefs.json").relative_to(REPO),
             (LOCALES / "main.json").relative_to(REPO), len(node_defs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
