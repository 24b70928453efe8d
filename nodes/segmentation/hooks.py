"""Decoder-feature extraction from a ComfyUI U-Net (host side: imports ComfyUI).

One call of ``extract_features``:

- clones the MODEL (never touches the incoming one) and adds two keyed, call-scoped hooks:
  an ``output_block_patch`` that records ``h`` as decoder block ``i`` receives it (= the output of
  block ``i - 1``), and an object patch on ``diffusion_model.out`` that records its input (= the
  output of the last decoder block). Both read the capture of the current call from a context
  variable, so no state lives on the patch objects;
- runs one sampling pass through ComfyUI's own guider (``nodes/comfy_sampling.run_custom_sampler``, shared with PnP) (model loading, patches, wrappers, the
  conditioning's extra model inputs) whose "sampler" evaluates the U-Net once per image and step on
  ``x_t = noise_scaling(sigma(t), noise, latent)`` with one fixed noise shared by every image (the
  official ``share_noise``), and returns its input unchanged;
- upsamples every block's output bilinearly to the latent size and concatenates them, step-major
  then block order (the official ``collect_features``), as (B, D, h, w) float32 on the CPU.
"""
from __future__ import annotations

import contextvars
import logging
from typing import Optional

import torch
import torch.nn.functional as F

import comfy.model_management
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

log = logging.getLogger(__name__)

PATCH_KEY = "diffusion_model.out"
_CAPTURE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("plugkit_seg_capture", default=None)


def unet_of(model, node: str) -> UNetModel:
    unet = getattr(model.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        kind = type(unet).__name__ if unet is not None else type(model.model).__name__
        raise ValueError(
            f"{node}: input 'model' is a {kind} model; feature segmentation reads U-Net decoder blocks and "
            f"supports SD1.x, SD2.x and SDXL U-Nets. Connect such a checkpoint.")
    return unet


def model_family(model) -> str:
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def capture_output_block_input(h, hsp, transformer_options):
    """output_block_patch: the input ``h`` of decoder block i is the output of block i - 1."""
    cap = _CAPTURE.get()
    block = transformer_options.get("block")
    if cap is not None and block is not None and block[0] == "output" and (block[1] - 1) in cap["wanted"]:
        cap["out"][block[1] - 1] = h.detach().float()
    return h, hsp


class CaptureLastBlock(torch.nn.Module):
    """Object patch for ``diffusion_model.out``: records its input (the last decoder block's output)."""

    def __init__(self, inner: torch.nn.Module, last: int):
        super().__init__()
        self.inner = inner
        self.last = last

    def forward(self, h):
        cap = _CAPTURE.get()
        if cap is not None and self.last in cap["wanted"]:
            cap["out"][self.last] = h.detach().float()
        return self.inner(h)


def empty_conditioning(model) -> list:
    """A CONDITIONING with a zero text context (77 tokens of the U-Net's context width) and, for
    models with an ADM input (SDXL), a zero pooled output."""
    unet = model.model.diffusion_model
    width = getattr(unet, "context_dim", None) or model.model.model_config.unet_config.get("context_dim") or 768
    extra = {}
    if getattr(unet, "num_classes", None) is not None:
        extra["pooled_output"] = torch.zeros(1, 1280)
    return [[torch.zeros(1, 77, int(width)), extra]]


def conditioning_state(conditioning) -> dict:
    """The tensors of the first CONDITIONING entry (kept in the segmenter, reused when segmenting)."""
    out = {"c_crossattn": conditioning[0][0].detach().float().cpu()[:1]}
    pooled = conditioning[0][1].get("pooled_output")
    if torch.is_tensor(pooled):
        out["pooled_output"] = pooled.detach().float().cpu()[:1]
    return out


def conditioning_from_state(state: dict) -> list:
    extra = {"pooled_output": state["pooled_output"]} if "pooled_output" in state else {}
    return [[state["c_crossattn"], extra]]


def extract_features(model, latent: torch.Tensor, steps, blocks, conditioning, seed: int, node: str,
                     progress=None) -> tuple[torch.Tensor, tuple]:
    """(B, C, h, w) raw VAE latent -> ((B, D, h, w) features, per-block channels)."""
    from ..comfy_sampling import run_custom_sampler

    unet = unet_of(model, node)
    n = len(unet.output_blocks)
    last = n - 1
    m = model.clone()
    m.set_model_output_block_patch(capture_output_block_input)
    m.add_object_patch(PATCH_KEY, CaptureLastBlock(m.get_model_object(PATCH_KEY), last))
    ms = m.get_model_object("model_sampling")
    b, c, h, w = latent.shape
    noise = torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(int(seed)))
    results: list = [None] * b
    channels: list = []

    def probe_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        lat = m.model.process_latent_in(latent.to(x))
        nz = noise.to(x)
        total = b * len(steps)
        done = 0
        for i in range(b):
            per_step = []
            for t in steps:
                comfy.model_management.throw_exception_if_processing_interrupted()
                sigma = ms.sigma(torch.tensor([float(t)], device=ms.sigmas.device)).to(x)
                x_t = ms.noise_scaling(sigma, nz, lat[i:i + 1])
                cap = {"wanted": set(blocks), "out": {}}
                token = _CAPTURE.set(cap)
                try:
                    with torch.no_grad():  # no graph outside ComfyUI's inference mode either
                        model_k(x_t, sigma, **extra_args)
                finally:
                    _CAPTURE.reset(token)
                missing = [k for k in blocks if k not in cap["out"]]
                if missing:
                    raise RuntimeError(f"{node}: decoder blocks {missing} produced no features; is another node "
                                       "replacing the U-Net's forward pass?")
                maps = [cap["out"][k][:1] for k in blocks]
                if not channels:
                    channels.extend(int(f.shape[1]) for f in maps)
                per_step.extend(F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
                                if tuple(f.shape[-2:]) != (h, w) else f for f in maps)
                done += 1
                if progress is not None:
                    progress(done, total)
            feats = torch.cat(per_step, dim=1)[0].cpu()
            if not torch.isfinite(feats).all():
                raise FloatingPointError(f"{node}: the U-Net's features contain NaN or inf (image {i}); check the "
                                         "model and the images.")
            results[i] = feats
        return x

    run_custom_sampler(m, conditioning, torch.zeros(1, c, h, w), torch.tensor([float(ms.sigma_max), 0.0]), probe_fn)
    return torch.stack(results), tuple(channels)
