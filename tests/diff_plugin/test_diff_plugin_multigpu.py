"""ComfyUI's MultiGPU path (0.23+) deep-clones every control per extra device
(``comfy.sampler_helpers.preprocess_multigpu_conds``); ControlBase's default raises NotImplementedError."""
from __future__ import annotations

import pytest
import torch


def _control(tiny_model):
    from plugkit.nodes.diff_plugin.hooks import PluginHandle, TaskPluginControl
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    torch.manual_seed(0)
    plugin = TaskPlugin("tiny_derain", scb_channels=32)
    for p in plugin.parameters():  # the released zero-init outputs would make every residual 0
        torch.nn.init.normal_(p, std=0.02)
    control = TaskPluginControl(PluginHandle(plugin), torch.randn(1, 4, 8, 8), strength=1.0)
    control.pre_run(tiny_model.model, tiny_model.model.model_sampling.percent_to_sigma)
    return control


def _residuals(control):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"c_crossattn": torch.randn(1, 256, 768, generator=torch.Generator().manual_seed(2))}
    sigma = torch.tensor([5.0])
    return [r for r in control.get_control(x, sigma, cond, 1, {})["output"] if r is not None]


def test_deepclone_multigpu_gives_an_independent_equal_control(comfy, tiny_model):
    control = _control(tiny_model)
    device = torch.device("cpu")
    clone = control.deepclone_multigpu(device, autoregister=True)
    assert type(clone) is type(control) and clone is not control
    assert control.multigpu_clones[device] is clone
    assert clone.handle.plugin is not control.handle.plugin
    assert clone.handle.patcher.load_device == device
    clone.pre_run(tiny_model.model, tiny_model.model.model_sampling.percent_to_sigma)
    want, got = _residuals(control), _residuals(clone)
    assert len(want) == 3 and any(float(r.abs().max()) > 0 for r in want)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Its weights are its own: changing the clone's leaves the original as it was.
    with torch.no_grad():
        next(clone.handle.plugin.scb.parameters()).add_(1.0)
    for a, b in zip(want, _residuals(control)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_comfyui_multigpu_preprocessing_clones_the_plugin_control(comfy, tiny_model):
    import comfy.sampler_helpers

    if not hasattr(comfy.sampler_helpers, "preprocess_multigpu_conds"):
        pytest.skip("this ComfyUI has no MultiGPU path (added in 0.23)")
    control = _control(tiny_model)
    extra = tiny_model.clone()
    model = tiny_model.clone()
    model.set_additional_models("multigpu", [extra])
    conds = {"positive": [{"control": control}]}
    comfy.sampler_helpers.preprocess_multigpu_conds(conds, model, {})
    clone = control.get_instance_for_device(extra.load_device)
    assert clone is not control and clone.handle.plugin is not control.handle.plugin
