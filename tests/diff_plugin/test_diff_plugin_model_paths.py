"""Plugins kept outside ComfyUI's models/ folder, declared in extra_model_paths.yaml, are found and
loaded: ComfyUI's own yaml loader registers the folder, our folder registration keeps it."""
from __future__ import annotations

from pathlib import Path

import pytest

from diff_plugin_testlib import write_released_plugin


def host_extra_config(comfy):
    """ComfyUI's own ``utils/extra_config.py``. Imported by file: once ComfyUI's ``nodes`` is imported
    (another test), its ``comfy/`` folder leads sys.path and ``utils`` would be ``comfy/utils.py``."""
    import importlib.util
    import sys

    loaded = sys.modules.get("utils.extra_config")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("plugkit_test_host_extra_config",
                                                  Path(comfy) / "utils" / "extra_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extra_model_paths_yaml_folder_is_listed_and_loads(comfy, tmp_path):
    import folder_paths

    load_extra_path_config = host_extra_config(comfy).load_extra_path_config

    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader

    from plugkit.nodes.diff_plugin.model_folders import plugin_folders

    shared = tmp_path / "shared_models"
    _, scb, _ = write_released_plugin(shared / "diff_plugin", "dehaze", seed=9)
    yaml_path = tmp_path / "extra_model_paths.yaml"
    yaml_path.write_text(f"team:\n  base_path: {shared}\n  diff_plugin: diff_plugin\n")
    before = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    try:
        load_extra_path_config(str(yaml_path))
        folders = plugin_folders()  # what the nodes call; must keep the yaml entry
        assert str(shared / "diff_plugin") in folders
        assert str(Path(folder_paths.models_dir) / "diff_plugin") in folders  # the default stays too
        options = PlugKitTaskPluginLoader.define_schema().inputs[0].options
        assert "dehaze" in options
        handle = PlugKitTaskPluginLoader.execute(plugin_name="dehaze").result[0]
        assert handle.name == "dehaze"
        for key in ("controlnet_cond_embedding.weight", "controlnet_down_blocks.2.weight"):
            assert handle.plugin.scb.state_dict()[key].equal(scb[key])
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(before)


def test_missing_plugin_names_every_searched_folder(comfy, tmp_path):
    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader
    from plugkit.nodes.diff_plugin.model_folders import plugin_folders

    with pytest.raises(ValueError) as err:
        PlugKitTaskPluginLoader.execute(plugin_name="no_such_plugin")
    message = str(err.value)
    assert "PlugKitTaskPluginLoader" in message and "no_such_plugin" in message
    for folder in plugin_folders():
        assert folder in message


@pytest.fixture
def plugin_folder(comfy, tmp_path):
    """A registered diff_plugin folder holding 'derain' and a selector, and a real plugin and selector
    outside every registered folder (what a hostile prompt would try to reach)."""
    import folder_paths
    import torch

    from plugkit.nodes.diff_plugin.model_folders import plugin_folders
    from plugkit.nodes.diff_plugin.plugin_selector import PromptTuner

    base = tmp_path / "models" / "diff_plugin"
    write_released_plugin(base, "derain", seed=0)
    outside = tmp_path / "elsewhere"
    write_released_plugin(outside, "evil", seed=1)
    torch.save({"model": PromptTuner().state_dict()}, outside / "PromptTunner.pt")
    plugin_folders()
    before = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    folder_paths.folder_names_and_paths["diff_plugin"] = ([str(base)], set())
    try:
        yield base, outside
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(before)


def _message(call, name) -> str:
    with pytest.raises(ValueError) as err:
        call(name)
    return str(err.value).replace(repr(name), "<name>")


def test_names_outside_the_folders_get_the_not_found_message(plugin_folder):
    """ComfyUI 0.3.75 does not check V3 dropdown values, so the node must: a name that is not in its list
    (absolute, '..', a file that is no plugin) gets exactly the message of a missing name, whether or not
    something exists there."""
    from plugkit.nodes.diff_plugin.nodes import PlugKitPluginSelector, PlugKitTaskPluginLoader

    base, outside = plugin_folder
    assert PlugKitTaskPluginLoader.execute(plugin_name="derain").result[0].name == "derain"
    hostile = [str(outside / "evil"), "../../elsewhere/evil", "../../elsewhere/evil/tpb.pt",
               "derain/../../../elsewhere/evil", "/etc/passwd", "../" * 12 + "etc/passwd", "/nonexistent/path",
               "derain/tpb.pt", str(base / "derain")]

    def load(name):
        return PlugKitTaskPluginLoader.execute(plugin_name=name)

    missing = _message(load, "no_such_plugin")
    assert missing.startswith("PlugKitTaskPluginLoader: input 'plugin_name':") and str(base) in missing
    for name in hostile:
        assert _message(load, name) == missing, name

    def select(name):
        return PlugKitPluginSelector.execute(clip=None, clip_vision=None, image=None, instruction="x",
                                             selector_name=name, plugin_1=object())

    missing = _message(select, "no_such_selector.pt")
    assert missing.startswith("PlugKitPluginSelector: input 'selector_name':")
    for name in [str(outside / "PromptTunner.pt"), "../../elsewhere/PromptTunner.pt", "/etc/passwd", "derain/tpb.pt"]:
        assert _message(select, name) == missing, name


def test_listing_offers_the_names_the_loader_accepts(plugin_folder):
    """Links the owner placed in the folder (a plugin kept on another disk) are listed and load, as in
    ComfyUI's own model folders; the test servers link their random plugins in the same way."""
    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader
    from plugkit.nodes.diff_plugin.model_folders import scan_folder

    base, outside = plugin_folder
    (base / "linked").symlink_to(outside / "evil")
    plugins, selectors = scan_folder()
    assert plugins == ["derain", "linked"] and selectors == []
    assert PlugKitTaskPluginLoader.define_schema().inputs[0].options == ["derain", "linked"]
    assert PlugKitTaskPluginLoader.execute(plugin_name="linked").result[0].name == "linked"


def test_choice_inputs_are_checked_by_the_nodes(comfy):
    from plugkit.nodes.diff_plugin.nodes import PlugKitPluginSelector, PlugKitRunPluginChain

    with pytest.raises(ValueError, match=r"^PlugKitPluginSelector: input 'rule' must be one of official \(score > 0\), above null, got 'best'\.$"):
        PlugKitPluginSelector.execute(clip=None, clip_vision=None, image=None, instruction="x",
                                      selector_name="s.pt", rule="best", plugin_1=object())
    with pytest.raises(ValueError, match=r"^PlugKitRunPluginChain: input 'scheduler' must be one of normal, simple, sgm_uniform, karras, got 'fast'\.$"):
        PlugKitRunPluginChain.execute(model=None, clip_vision=None, vae=None, image=None, plugin=object(),
                                      scheduler="fast")
    with pytest.raises(ValueError, match=r"^PlugKitRunPluginChain: input 'sampler_name' must be one of official, uni_pc_bh2, .*, got '\.\./x'\.$"):
        PlugKitRunPluginChain.execute(model=None, clip_vision=None, vae=None, image=None, plugin=object(),
                                      sampler_name="../x")
