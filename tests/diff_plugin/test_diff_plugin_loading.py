"""Diff-Plugin loading in a real ComfyUI: a plugin retrained under the same name is reloaded (ComfyUI's
own is-changed check decides), and the released Plugin-Selector file format loads with weights_only."""
from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from diff_plugin_testlib import random_state, write_released_plugin


@pytest.fixture
def plugin_dir(comfy, tmp_path):
    import folder_paths

    folder_paths.add_model_folder_path("diff_plugin", str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.folder_names_and_paths["diff_plugin"][0].remove(str(tmp_path))


def comfyui_is_changed(monkeypatch, plugin_name: str):
    """What ComfyUI's executor compares between two runs of a prompt holding the loader (IsChangedCache:
    the node's fingerprint_inputs, or nothing, in which case the cached output is reused)."""
    import execution
    import nodes
    from comfy_execution.graph import DynamicPrompt

    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "PlugKitTaskPluginLoader", PlugKitTaskPluginLoader)
    prompt = {"1": {"class_type": "PlugKitTaskPluginLoader", "inputs": {"plugin_name": plugin_name}}}
    cache = execution.IsChangedCache("test", DynamicPrompt(prompt), None)
    return asyncio.run(cache.get("1"))


def test_loader_reloads_a_plugin_retrained_under_the_same_name(plugin_dir, monkeypatch):
    """Train, load, retrain under the same name, load again in one session: ComfyUI sees the change and
    the loader returns the new weights. Without fingerprint_inputs ComfyUI's answer is False both
    times, i.e. the first load's output is reused (the bug)."""
    from plugkit.nodes.diff_plugin import plugin_files
    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    def train(seed):
        plugin = TaskPlugin("my_task", scb_channels=32)
        plugin.load_state_dict(random_state(plugin, seed))
        plugin_files.save_plugin(plugin, plugin_dir / "my_task.safetensors")  # the training node's atomic save
        return plugin

    first = train(1)
    before = comfyui_is_changed(monkeypatch, "my_task.safetensors")
    assert before not in (False, None)
    assert comfyui_is_changed(monkeypatch, "my_task.safetensors") == before  # unchanged file: cache kept
    loaded = PlugKitTaskPluginLoader.execute(plugin_name="my_task.safetensors").result[0]
    torch.testing.assert_close(loaded.plugin.tpb.state_dict(), first.tpb.state_dict())
    second = train(2)
    after = comfyui_is_changed(monkeypatch, "my_task.safetensors")
    assert after != before
    reloaded = PlugKitTaskPluginLoader.execute(plugin_name="my_task.safetensors").result[0]
    torch.testing.assert_close(reloaded.plugin.scb.state_dict(), second.scb.state_dict())

    # a released folder: replacing its tpb.pt changes the fingerprint too
    write_released_plugin(plugin_dir, "derain", seed=0)
    folder_before = comfyui_is_changed(monkeypatch, "derain")
    write_released_plugin(plugin_dir, "derain", seed=3)
    assert comfyui_is_changed(monkeypatch, "derain") != folder_before


# --- the released selector: plugin_selector/PromptTunner.pt ------------------------------------------------

class OfficialPromptTunner(nn.Module):
    """modules/prompt.py ``PromptTunnerModel`` with ``tunner_for_visual=True`` (demo.py's setting), as written."""

    def __init__(self):
        super().__init__()
        self.proj_v = nn.Linear(768, 768)
        self.proj_t = nn.Linear(768, 768)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, clip_t, plug_in_embeddings):
        bsz = plug_in_embeddings.shape[0]
        plug_in_embeddings = plug_in_embeddings.permute(0, 2, 1)
        plug_in_embeddings = torch.nn.functional.max_pool1d(plug_in_embeddings, kernel_size=plug_in_embeddings.size(2))
        plug_in_embeddings = plug_in_embeddings.permute(0, 2, 1)
        vis = self.proj_v(plug_in_embeddings)
        norm_vis = vis / vis.norm(dim=-1, keepdim=True)
        text = self.proj_t(clip_t).squeeze(1)
        text = text.unsqueeze(0).repeat(bsz, 1, 1)
        norm_text = text / text.norm(dim=-1, keepdim=True)
        score = torch.bmm(norm_vis, norm_text.transpose(1, 2)).squeeze(1)
        return self.logit_scale.exp() * score


@pytest.mark.parametrize("data_parallel", [False, True])
def test_released_selector_file_loads_with_weights_only(tmp_path, monkeypatch, data_parallel):
    """The file as the official code writes it: ``torch.save({'model': model.state_dict()})``, the model
    possibly wrapped in DataParallel (keys 'module.proj_v.weight', ...). It is read by torch.load with
    weights_only=True (spied: the only torch.load call), and scores equal the official module's."""
    from plugkit.nodes.diff_plugin import plugin_files

    torch.manual_seed(0)
    official = OfficialPromptTunner().eval()
    with torch.no_grad():
        official.logit_scale.add_(0.3)  # a trained value, not the init
    saved = nn.DataParallel(official) if data_parallel else official
    path = tmp_path / "plugin_selector" / "PromptTunner.pt"
    path.parent.mkdir()
    torch.save({"model": saved.state_dict()}, path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["model"]) == data_parallel

    real_load = torch.load
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    tuner = plugin_files.load_selector(path)
    assert calls == [True]
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 768, generator=gen)
    slots = torch.randn(3, 256, 768, generator=gen)
    with torch.no_grad():
        want = official(text[:, None], slots)
        got = tuner(text, slots)
    torch.testing.assert_close(got, want.reshape(-1), rtol=1e-5, atol=1e-5)


def test_selector_file_that_needs_code_is_refused(tmp_path):
    """Negative control for weights_only: a checkpoint that also pickles an object (training scripts save
    their argparse Namespace) is refused with an error naming the file, not executed."""
    from plugkit.nodes.diff_plugin import plugin_files

    path = tmp_path / "PromptTunner.pt"
    torch.save({"model": OfficialPromptTunner().state_dict(), "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(plugin_files.PluginFileError, match="(?s)PromptTunner.pt.*not a plain weights file"):
        plugin_files.load_selector(path)
