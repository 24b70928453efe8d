"""Chinese (zh) locale: every node, input, output and category of the live schemas has its Chinese
text in locales/zh/, every node its js/docs/<NodeId>/zh.md, and ComfyUI's own loader reads the files.

Regenerate after a schema change: ``.venv/bin/python -m tools.node_docs.locales`` (texts: tools/node_docs/locales_zh.py).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ZH = REPO / "locales" / "zh"


@pytest.fixture(scope="module")
def infos(comfy):
    from tools.node_docs.locales import live_node_infos

    return live_node_infos()


@pytest.mark.parametrize("name", ["main.json", "nodeDefs.json"])
def test_files_are_json(name):
    data = json.loads((ZH / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict) and data


def test_every_node_input_output_and_category_has_chinese(infos):
    from tools.node_docs.locales import missing

    assert len(infos) >= 11
    gaps = missing(infos)
    assert not gaps, "missing Chinese texts (tools/node_docs/locales_zh.py):\n" + "\n".join(gaps)
    node_defs = json.loads((ZH / "nodeDefs.json").read_text(encoding="utf-8"))
    for info in infos:
        entry = node_defs.get(info["name"])
        assert entry, f"locales/zh/nodeDefs.json has no {info['name']}"
        assert entry["display_name"] and entry["description"]
        for section in ("required", "optional"):
            for name in info["input"].get(section) or {}:
                assert entry["inputs"][name]["name"] and entry["inputs"][name]["tooltip"], (info["name"], name)
        assert sorted(entry["outputs"]) == [str(i) for i in range(len(info["output"]))], info["name"]
        page = REPO / "js" / "docs" / info["name"] / "zh.md"
        assert page.is_file(), f"no Chinese help page {page.relative_to(REPO)}"


def test_missing_entries_are_reported(infos):
    """Negative control: the check above fails when one input, one output or one node lacks its text."""
    from tools.node_docs import locales_zh
    from tools.node_docs.locales import missing

    info = next(i for i in infos if i["name"] == "PlugKitFreeU")
    texts = copy.deepcopy(locales_zh.NODES)
    del texts["PlugKitFreeU"]["inputs"]["b2"]
    texts["PlugKitFreeU"]["outputs"] = []
    assert missing([info], texts) == sorted([
        "PlugKitFreeU: input 'b2' has no Chinese name and tooltip",
        "PlugKitFreeU: needs 1 output (name, tooltip) pairs, has 0"])
    del texts["PlugKitFreeU"]
    assert missing([info], texts) == ["PlugKitFreeU: no entry in tools/node_docs/locales_zh.py NODES"]
    grown = copy.deepcopy(info)
    grown["input"]["optional"]["new_input"] = ["INT", {"tooltip": "x"}]
    assert missing([grown]) == ["PlugKitFreeU: input 'new_input' has no Chinese name and tooltip"]


def test_generated_files_are_current(infos):
    from tools.node_docs.locales import build, dump, help_page, help_page_text

    node_defs, main = build(infos)
    stale = "stale: run `.venv/bin/python -m tools.node_docs.locales`"
    assert (ZH / "nodeDefs.json").read_text(encoding="utf-8") == dump(node_defs), stale
    assert (ZH / "main.json").read_text(encoding="utf-8") == dump(main), stale
    for info in infos:
        assert help_page(info["name"]).read_text(encoding="utf-8") == help_page_text(info), (info["name"], stale)


def test_comfyui_loads_the_locale(comfy, tmp_path, infos):
    """ComfyUI's own loader (app/custom_node_manager.py, served at GET /i18n) merges our files."""
    import sys

    import folder_paths

    # After ComfyUI's `nodes` import (another test), comfy/ leads sys.path and `utils` may already be
    # imported as comfy/utils.py; the app module needs the host's utils package, as in the server.
    # Import it with the host root first and no `utils` module loaded, then put the earlier one back.
    def utils_modules():
        return [k for k in sys.modules if k == "utils" or k.startswith("utils.")]

    earlier = {k: sys.modules.pop(k) for k in utils_modules()}
    sys.path.insert(0, str(comfy))
    try:
        from app.custom_node_manager import CustomNodeManager
    finally:
        sys.path.remove(str(comfy))
        for k in utils_modules():
            del sys.modules[k]
        sys.modules.update(earlier)

    (tmp_path / "plugkit").symlink_to(REPO, target_is_directory=True)  # a registry install's folder name
    saved = folder_paths.folder_names_and_paths["custom_nodes"]
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(tmp_path)], set())
    try:
        translations = CustomNodeManager().build_translations()
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"] = saved
    zh = translations["zh"]
    assert zh["nodeCategories"]["Differential Diffusion"].startswith("差分扩散")
    for info in infos:
        assert zh["nodeDefs"][info["name"]]["display_name"], info["name"]
    assert zh["nodeDefs"]["PlugKitFreeU"]["inputs"]["start_percent"]["name"] == "开始百分比"
