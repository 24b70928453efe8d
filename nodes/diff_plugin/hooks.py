"""What ComfyUI calls while sampling with a Task-Plugin: the loaded handle, the SCB as a ControlBase,
the cfg warning (an OUTER_SAMPLE wrapper), and the training-side U-Net patch that adds the SCB residuals.

The SCB rides on the conditioning's ``control`` key, so the core samplers run it every step, load it
with the U-Net (``get_models``), chain it with core ControlNets (``previous_controlnet``) and clean it
up after the run. Its three residuals are returned under ``output`` at positions 0..2 (input-block
order, like core ControlNets): ComfyUI adds ``output`` residuals to the skip features as the decoder
pops them, so they land on the first three skips, consumed by output_blocks 11, 10, 9 -- exactly
diffusers' ``down_block_additional_residuals`` (which changes the skips only, not the encoder path).
"""
from __future__ import annotations

import copy
import logging

import torch

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher

from .task_plugin import CONTEXT_DIM, TaskPlugin

log = logging.getLogger(__name__)

SD1_SKIPS = 12
CFG_WRAPPER_KEY = "plugkit_diff_plugin_cfg"


class PluginHandle:
    """What a PLUGKIT_TASK_PLUGIN socket carries: the plugin module and the one ModelPatcher that
    lets ComfyUI's model management load and offload it."""

    def __init__(self, plugin: TaskPlugin, source: str = "", load_device=None):
        self.plugin = plugin.eval().requires_grad_(False)
        self.source = source
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.plugin,
            load_device=load_device if load_device is not None else comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )

    @property
    def name(self) -> str:
        return self.plugin.name

    def __deepcopy__(self, memo):  # a handle is shared, like a loaded model
        return self

    def __repr__(self) -> str:
        return f"PluginHandle({self.plugin.name!r}, {self.source!r})"


class TaskPluginControl(comfy.controlnet.ControlBase):
    """Runs the plugin's SCB on the degraded latent each step; residuals for the first three skips."""

    def __init__(self, handle: PluginHandle, cond_latent: torch.Tensor, strength: float = 1.0):
        super().__init__()
        self.handle = handle
        self.cond_latent = cond_latent  # already process_in()-scaled, [B, 4, h, w]
        self.strength = strength
        self.model_sampling_current = None

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling

    def cleanup(self):
        self.model_sampling_current = None
        super().cleanup()

    def get_models(self):
        return super().get_models() + [self.handle.patcher]

    def copy(self):
        c = TaskPluginControl(self.handle, self.cond_latent, self.strength)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device, autoregister=False):
        """ComfyUI's MultiGPU path (0.23+) runs one control per device: a copy whose plugin weights are
        its own, loaded on ``load_device`` (as core ControlNet does)."""
        c = self.copy()
        c.handle = PluginHandle(copy.deepcopy(self.handle.plugin), self.handle.source, load_device=load_device)
        if autoregister:  # ControlBase has the dict since 0.23; older hosts never call this
            self.__dict__.setdefault("multigpu_clones", {})[load_device] = c
        return c

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None:
            if t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]:
                return control_prev
        scb = self.handle.plugin.scb
        weight = scb.controlnet_cond_embedding.weight
        latent = self.cond_latent.to(device=weight.device, dtype=weight.dtype)
        if latent.shape[-2:] != x_noisy.shape[-2:]:
            latent = torch.nn.functional.interpolate(latent, size=x_noisy.shape[-2:], mode="bilinear", align_corners=False)
        if latent.shape[0] != x_noisy.shape[0]:
            latent = comfy.controlnet.broadcast_image_to(latent, x_noisy.shape[0], batched_number)
        context = cond["c_crossattn"].to(device=weight.device, dtype=weight.dtype)
        timestep = self.model_sampling_current.timestep(t).to(device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            residuals = scb(latent, timestep, context)
        residuals = [r.to(device=x_noisy.device) for r in residuals]
        control = {"input": [], "middle": [], "output": residuals + [None] * (SD1_SKIPS - len(residuals))}
        return self.control_merge(control, control_prev, output_dtype=x_noisy.dtype)


def warn_if_guided(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper of a model with a Task-Plugin applied: Diff-Plugin samples without guidance.
    A stateless check of the guider's cfg, once per sampling run."""
    guider = executor.class_obj
    cfgs = [getattr(guider, name) for name in ("cfg", "cfg1", "cfg2") if isinstance(getattr(guider, name, None), (int, float))]
    off = [c for c in cfgs if abs(float(c) - 1.0) > 1e-6]
    if off:
        log.warning(
            "PlugKitApplyTaskPlugin: this model carries a Diff-Plugin Task-Plugin and is sampled with cfg %s. "
            "Task-Plugins are sampled without guidance: set cfg to 1.0 in the sampler (KSampler's default 8.0 "
            "washes the result out and mixes in the 'negative' conditioning, which has no plugin). For the exact "
            "official sampler use Run Diff-Plugin Chain, or SamplerCustom with the Diff-Plugin sampler and sigmas.",
            ", ".join(f"{float(c):g}" for c in off))
    return executor(*args, **kwargs)


def skip_residual_patch(residuals):
    """The training-side U-Net patch (an ``output_block_patch``): the SCB residuals added, out of place, to
    the skips that output_blocks 9, 10, 11 consume, i.e. diffusers' down_block_additional_residuals[0:3]."""
    def add_residual(h, hsp, transformer_options):
        index = transformer_options["block"][1]
        if index >= SD1_SKIPS - len(residuals):
            hsp = hsp + residuals[SD1_SKIPS - 1 - index].to(hsp.dtype)
        return h, hsp

    return add_residual


def check_sd1_model(model, node: str, scb_channels: int) -> None:
    """A clear error for models the released plugins cannot drive (non-SD1.x families)."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    context_dim = unet_config.get("context_dim")
    diffusion_model = model.get_model_object("diffusion_model")
    blocks = getattr(diffusion_model, "input_blocks", None)
    if context_dim != CONTEXT_DIM or blocks is None or len(blocks) != SD1_SKIPS:
        raise ValueError(
            f"{node}: input 'model' is not an SD 1.x U-Net (context dim {context_dim}, "
            f"{'no' if blocks is None else len(blocks)} input blocks). Diff-Plugin's Task-Plugins are trained for "
            "SD 1.x (context dim 768, 12 skips); load an SD 1.4/1.5 checkpoint."
        )
    channels = unet_config.get("model_channels")
    if channels != scb_channels:
        raise ValueError(
            f"{node}: input 'model' has {channels} base channels but the plugin's SCB outputs {scb_channels}; "
            "use an SD 1.x checkpoint (320 channels) with the released plugins."
        )
