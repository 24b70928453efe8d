"""Differential Diffusion's per-step masks: which pixels are free to change at the current step.

Pure torch (no ComfyUI import). Masks here always use ComfyUI's convention, the *change* value:
1 = change freely, 0 = keep. The official code (exx8/differential-diffusion) uses the *keep* value
k = 1 - change. Two schedules:

- ``sigma`` (ComfyUI core's rule): the threshold falls linearly in model timestep from 1 at the
  first sigma to 0 at ``max(last sigma, sigma_min)``; a pixel is free once ``change >= threshold``.
- ``step`` (the official rule, exx8/differential-diffusion ``SD2/diff_pipe.py``): with N steps
  run, the official loop resets a pixel to the original (re-noised) at the *input* of step i
  (0-based) while ``keep > i / N`` and then lets the model move it in that step. In ComfyUI a held
  pixel's model *output* is reset as well (``KSamplerX0Inpaint``), and holding it at step i is what
  resets the input of step i + 1; so the same rule reads "held at step i while
  ``keep > (i + 1) / N``". A pixel with keep 1 is moved once, in the last step, as officially;
  ``exact_keep`` holds it on that step too.

Written for PlugKit from the paper (Levin & Fried, "Differential Diffusion: Giving Each Pixel Its
Strength", arXiv:2306.00950) and the behaviour of the official and core implementations.
"""
from __future__ import annotations

import torch

__all__ = [
    "sigma_threshold",
    "sigma_free_mask",
    "step_index",
    "step_free_mask",
    "blend_strength",
]


def sigma_threshold(ts_now, ts_from, ts_to):
    """Core's threshold: 1 at the first step's timestep, 0 at ``ts_to``, linear in between."""
    return (ts_now - ts_to) / (ts_from - ts_to)


def sigma_free_mask(change: torch.Tensor, threshold, exact_keep: bool = False) -> torch.Tensor:
    """Binary free mask for the ``sigma`` schedule: 1 where ``change >= threshold``.

    ``exact_keep``: a pixel whose change value is exactly 0 is never freed, even on a final step
    whose threshold has reached 0 (schedulers ending at the model's minimum sigma: ``normal``,
    ``karras``, ...). Without it (core's behaviour) every pixel is free on such a step.
    """
    free = change >= threshold
    if exact_keep:
        free = free & (change > 0)
    return free.to(change.dtype)


def step_index(sigma, sigmas: torch.Tensor, rtol: float = 1e-4) -> int:
    """Index (0..N-1) of the step in progress at ``sigma`` among the N steps of ``sigmas``.

    ``sigmas`` holds the N+1 sigmas actually run (decreasing). A sigma equal to ``sigmas[i]`` (within
    ``rtol``) is step i; a sigma between two entries (an intermediate evaluation of a multi-stage
    sampler) belongs to the step that started above it. Derived from the values alone: no counter.
    """
    sigmas = sigmas.detach().flatten().to(torch.float64)
    n = max(sigmas.numel() - 1, 1)
    s = float(sigma)
    tol = rtol * max(abs(s), 1e-12)
    started = int((sigmas[:n] >= s - tol).sum().item())
    return min(max(started - 1, 0), n - 1)


# A map value within this distance of a threshold counts as equal to it: the official compares
# float32 values (``map > i / N``), where an 8-bit map value k/255 that equals i/N exactly is the
# same float32 number (both are correctly rounded), while ours arrives as ``change = 1 - keep``, one
# float32 rounding away. Distinct 8-bit values lie >= 1/(255 N) from a threshold (3.9e-6 at N=1000).
TIE_TOLERANCE = 1e-7


def step_free_mask(change: torch.Tensor, index: int, steps: int, exact_keep: bool = False,
                   last_of_run: bool = False) -> torch.Tensor:
    """Binary free mask for the ``step`` schedule at step ``index`` of ``steps`` (ComfyUI's sampler).

    Officially the input of step i is reset while ``keep > i / steps``; ComfyUI's sampler also
    resets a held pixel's output, which is the input of the next step, so the pixel is held at
    step ``index`` while ``keep > (index + 1) / steps`` (ties as in the official float32
    comparison, see ``TIE_TOLERANCE``) and free otherwise: it is moved by the model in the step
    whose input the official code last resets. keep = 1 - change. A pixel with keep 1 is free only
    on the last step (moved once, as officially); ``exact_keep`` holds change-0 pixels there too.
    ``last_of_run``: the sampler's last step, which the official loop never follows with a reset,
    so every pixel is free (automatic when ``index`` is ``steps - 1``; needed when the thresholds
    span more steps than the run, as the official SDXL code's do at strength < 1).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    keep = 1.0 - change.to(torch.float64)
    if last_of_run:
        index = steps - 1
    free = keep <= (index + 1) / steps + TIE_TOLERANCE
    if exact_keep:
        free = free & (change > 0)
    return free.to(change.dtype)


def blend_strength(binary: torch.Tensor, change: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength`` < 1 mixes the binary mask with the soft map: ``s * binary + (1 - s) * change``.

    ``strength`` 1 (default) returns the binary mask; 0 returns the soft map (plain soft-mask
    inpainting). Core treats 0 like 1; we do not.
    """
    if strength >= 1:
        return binary
    return strength * binary + (1 - strength) * change
