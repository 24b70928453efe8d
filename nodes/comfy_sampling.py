"""One model run through ComfyUI's own sampling machinery, for techniques that drive the model
themselves (PnP inversion and probes, segmentation feature extraction)."""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers


def run_custom_sampler(model, conditioning, latent: torch.Tensor, sigmas: torch.Tensor, sampler_fn: Callable):
    """Run ``sampler_fn`` (a k-diffusion style function) through ComfyUI's own guider, without CFG.

    ComfyUI then builds the model inputs from ``conditioning``, loads the model with its patches
    and runs every wrapper, exactly as a sampler node would. Returns the guider's output latent.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = torch.zeros_like(latent)
    out = guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas, disable_pbar=True, seed=0)
    return out.to(comfy.model_management.intermediate_device())
