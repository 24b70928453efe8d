"""Plugins kept outside ComfyUI's models/ folder, declared in extra_model_paths.yaml, are found and
loaded: ComfyUI's own yaml loader registers the folder, our folder registration keeps it."""
from __future__ import annotations

from pathlib import Path

import pytest

from diff_plugin_testlib import write_released_plugin


def test_extra_model_paths_yaml_folder_is_listed_and_loads(comfy, tmp_path):
    import folder_paths
    from utils.extra_config import load_extra_path_config

    from plugkit.nodes.diff_plugin.plugin_nodes import PlugKitTaskPluginLoader, plugin_folders

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
    from plugkit.nodes.diff_plugin.plugin_nodes import PlugKitTaskPluginLoader, plugin_folders

    with pytest.raises(ValueError) as err:
        PlugKitTaskPluginLoader.execute(plugin_name="no_such_plugin")
    message = str(err.value)
    assert "PlugKitTaskPluginLoader" in message and "no_such_plugin" in message
    for folder in plugin_folders():
        assert folder in message
