"""Differential Diffusion nodes: PlugKitDifferentialDiffusion and PlugKitChangeMap.

Technique: Levin & Fried, "Differential Diffusion: Giving Each Pixel Its Strength" (2023),
official code exx8/differential-diffusion. ComfyUI core's DifferentialDiffusion node is the hook
model (a denoise-mask function); this pack's code is written from those sources, not copied.
The math lives in ``mask_schedule`` and ``change_map``, the denoise-mask function in ``hooks``;
this file is glue.
"""
from __future__ import annotations

import logging
import math

import torch

from ..comfy_io import io, ui
from ..node_errors import check_choice, input_error
from . import change_map as cm
from .hooks import SCHEDULES, DenoiseMaskSchedule, attach

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Differential Diffusion"
DD_NODE = "PlugKitDifferentialDiffusion"
MAP_NODE = "PlugKitChangeMap"


def attach_change_map(samples: dict, change_map: torch.Tensor, convention: str, node: str,
                      resize: str = cm.RESIZE_BILINEAR) -> dict:
    """A copy of ``samples`` whose ``noise_mask`` is the map, white=change, resized to the latent."""
    latent = samples["samples"]
    lat_b = latent.shape[0]
    lat_hw = (latent.shape[-2], latent.shape[-1])
    try:
        m = cm.as_batch(change_map)
    except ValueError as e:
        raise ValueError(f"{node}: input 'change_map': {e}") from None
    bad = cm.check_finite(m)
    if bad is not None:
        raise input_error(node, "change_map", f"holds {bad}; a change map must be finite values in 0..1",
                          "fix the node that makes the map (a division by zero, an empty normalisation) "
                          "or clean it first")
    if m.shape[0] not in (1, lat_b):
        raise input_error(node, "change_map", f"has {m.shape[0]} maps but 'samples' holds a batch of {lat_b}",
                          f"connect a single map (used for every item) or exactly {lat_b} maps (one per item)")
    map_hw = (m.shape[-2], m.shape[-1])
    if cm.aspect_mismatch(map_hw, lat_hw):
        log.warning(
            "%s: the change map is %dx%d (w x h) but the latent is %dx%d; it is stretched to fit. "
            "Crop or pad the map to the image's aspect ratio to avoid a distorted map.",
            node, map_hw[1], map_hw[0], lat_hw[1], lat_hw[0],
        )
    change = cm.to_change(m, convention)
    out = dict(samples)
    if "noise_mask" in samples:
        log.info("%s: the latent already had a noise_mask; the change map replaces it.", node)
    out["noise_mask"] = cm.resize_to(change, lat_hw, resize).to(latent.device)
    return out


def check_dd_inputs(strength, map_convention, schedule, map_resize, total_steps, first_step) -> None:
    """Refuse bad PlugKitDifferentialDiffusion inputs (NaN included) with the node's error."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise input_error(DD_NODE, "strength", f"is {strength!r}", "use a number from 0 to 1 (1: Differential Diffusion)")
    for name, value in (("total_steps", total_steps), ("first_step", first_step)):
        if not (isinstance(value, int) and 0 <= value <= 10000):
            raise input_error(DD_NODE, name, f"is {value!r}", "use a whole number from 0 to 10000")
    if first_step > 0 and first_step >= total_steps:
        raise input_error(DD_NODE, "first_step", f"({first_step}) needs 'total_steps' above it (got {total_steps})",
                          "set total_steps to the full schedule's step count, or first_step to 0")
    check_choice(map_resize, cm.RESIZE_MODES, DD_NODE, "map_resize")
    check_choice(map_convention, cm.CONVENTIONS, DD_NODE, "map_convention")
    check_choice(schedule, SCHEDULES, DD_NODE, "schedule")


def check_map_inputs(image, mask, channel, gamma, contrast, blur_radius, levels, min_value, max_value):
    """Refuse bad PlugKitChangeMap inputs (NaN included); returns (name, tensor) of the connected source."""
    if (image is None) == (mask is None):
        raise ValueError(f"{MAP_NODE}: connect exactly one of the inputs 'image' and 'mask' "
                         f"({'both are' if image is not None else 'neither is'} connected).")
    check_choice(channel, cm.CHANNELS, MAP_NODE, "channel")
    for name, value, low, high in (("gamma", gamma, 0.05, 10.0), ("contrast", contrast, 0.0, 10.0),
                                   ("blur_radius", blur_radius, 0.0, 256.0), ("min_value", min_value, 0.0, 1.0),
                                   ("max_value", max_value, 0.0, 1.0), ("levels", levels, 0, 256)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise input_error(MAP_NODE, name, f"is {value!r}", f"use a number from {low} to {high}")
    if min_value > max_value:
        raise input_error(MAP_NODE, "min_value", f"({min_value}) is above 'max_value' ({max_value})", "lower it")
    source_name, source = ("image", image) if image is not None else ("mask", mask)
    bad = cm.check_finite(source)
    if bad is not None:
        raise input_error(MAP_NODE, source_name, f"holds {bad}", "connect an image or mask of finite values in 0..1")
    return source_name, source


class PlugKitDifferentialDiffusion(io.ComfyNode):
    """Differential Diffusion with the change map on the node, both conventions and both schedules."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=DD_NODE,
            display_name="Differential Diffusion (PlugKit)",
            category=CATEGORY,
            description=(
                "Lets every pixel change by its own amount, following a change map. Connect the MODEL "
                "and LATENT outputs to the same sampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (any model ComfyUI samples: SD1.x, SDXL, SD3, Flux, ...)."),
                io.Latent.Input("samples", tooltip="The encoded image to edit (e.g. from VAE Encode)."),
                io.Mask.Input("change_map", tooltip="How much each pixel may change, 0..1 (see map_convention). Any size: it is resized to the latent."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: the map's per-step binary masks (Differential Diffusion). Lower values blend in the soft map (0: plain soft-mask inpainting)."),
                io.Combo.Input("map_convention", options=list(cm.CONVENTIONS), default=cm.WHITE_CHANGE,
                               tooltip="white=change: ComfyUI's convention (white = change fully, black = keep). white=keep: the official code's and paper's convention."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="sigma",
                               tooltip="sigma: ComfyUI core's rule (threshold linear in the model's timestep). step: the official rule (exx8/differential-diffusion): a pixel with keep value k is reset to the original at the start of each step i < k*N of the N steps run; with euler on ddim_uniform sigmas it equals the official DDIM loop (measured: under 1e-6 relative at 8, 10 and 50 steps, white=keep)."),
                io.Boolean.Input("exact_keep", default=False, optional=True,
                                 tooltip="Never free pixels whose change value is 0. sigma: also on the final step of schedulers that end at the model's minimum sigma (normal, karras), where core frees them. step: also on the last step, where the official code moves them once. Off reproduces core (sigma) and the official code (step)."),
                io.Combo.Input("map_resize", options=list(cm.RESIZE_MODES), default=cm.RESIZE_BILINEAR, optional=True,
                               tooltip="How the map is fitted to the latent. bilinear: no antialiasing, exactly as the official code and core (SetLatentNoiseMask) do. area: each latent pixel gets the mean of the map pixels it covers (no aliasing of hard edges when shrinking 8x)."),
                io.Int.Input("total_steps", default=0, min=0, max=10000, optional=True,
                             tooltip="step schedule only. 0: thresholds over the steps this sampler runs (official SD2 code). N: thresholds over N steps of which this run is steps first_step.. (official SDXL code: N = its num_inference_steps; for a refiner pass first_step = the base pass's steps; with denoise < 1, N = the scheduler's full step count)."),
                io.Int.Input("first_step", default=0, min=0, max=10000, optional=True,
                             tooltip="step schedule with total_steps > 0: the global index of this run's first step (e.g. KSamplerAdvanced's start_at_step)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the Differential Diffusion mask schedule."),
                io.Latent.Output(display_name="LATENT", tooltip="The samples with the change map attached as their noise mask (white = change, latent size)."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, change_map, strength=1.0, map_convention=cm.WHITE_CHANGE,
                schedule="sigma", exact_keep=False, map_resize=cm.RESIZE_BILINEAR, total_steps=0,
                first_step=0) -> io.NodeOutput:
        check_dd_inputs(strength, map_convention, schedule, map_resize, total_steps, first_step)
        latent = attach_change_map(samples, change_map, map_convention, DD_NODE, map_resize)
        m = model.clone()
        attach(m, DenoiseMaskSchedule(schedule, strength, exact_keep, total_steps, first_step), DD_NODE)
        return io.NodeOutput(m, latent)


class PlugKitChangeMap(io.ComfyNode):
    """Builds a change map (MASK) from an IMAGE or a MASK, with a preview."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=MAP_NODE,
            display_name="Change Map (PlugKit)",
            category=CATEGORY,
            description="Turns an image (gradient, depth map, drawing) or a mask into a Differential Diffusion change map.",
            inputs=[
                io.Image.Input("image", optional=True, tooltip="Source image (connect this or mask, not both)."),
                io.Mask.Input("mask", optional=True, tooltip="Source mask (connect this or image, not both)."),
                io.Combo.Input("channel", options=list(cm.CHANNELS), default="luminance",
                               tooltip="Which image value becomes the map: luminance (Rec. 601, exactly as Pillow's \"L\", which the official code loads maps with; 8-bit steps), luminance_709 (Rec. 709, unquantised), one channel, or the RGB average. Ignored for a mask."),
                io.Boolean.Input("invert", default=False, tooltip="Flip the map (1 - value), e.g. to turn a near=white depth map into near=keep."),
                io.Float.Input("gamma", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="value ** gamma: above 1 darkens the mid-tones, below 1 brightens them."),
                io.Float.Input("contrast", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Contrast around mid-grey: (value - 0.5) * contrast + 0.5, clamped to 0..1."),
                io.Float.Input("blur_radius", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian blur / feather radius in pixels (sigma = radius / 2); softens seams."),
                io.Int.Input("levels", default=0, min=0, max=256,
                             tooltip="Quantise into this many evenly spaced levels (0 or 1: off)."),
                io.Float.Input("min_value", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Clamp: lowest value of the map."),
                io.Float.Input("max_value", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Clamp: highest value of the map."),
            ],
            outputs=[
                io.Mask.Output(display_name="change_map", tooltip="The change map (MASK, 0..1)."),
                io.Image.Output(display_name="preview", tooltip="The map as a grey IMAGE."),
            ],
        )

    @classmethod
    def execute(cls, image=None, mask=None, channel="luminance", invert=False, gamma=1.0, contrast=1.0,
                blur_radius=0.0, levels=0, min_value=0.0, max_value=1.0) -> io.NodeOutput:
        source_name, source = check_map_inputs(image, mask, channel, gamma, contrast, blur_radius, levels,
                                               min_value, max_value)
        try:
            out = cm.build_change_map(
                source, is_image=image is not None, channel=channel, invert=invert, gamma=gamma,
                contrast=contrast, blur_radius=blur_radius, levels=levels, low=min_value, high=max_value,
            )
        except ValueError as e:
            raise ValueError(f"{MAP_NODE}: input '{source_name}': {e}") from None
        preview = out.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(out, preview, ui=ui.PreviewMask(out))


NODES = [PlugKitDifferentialDiffusion, PlugKitChangeMap]
