"""Differential Diffusion's per-step masks: which pixels are free to change at the current step.

Pure torch (no ComfyUI import). Masks here always use ComfyUI's convention, the *change* value:
1 = change freely, 0 = keep. The official code (exx8/differential-diffusion) uses the *keep* value
k = 1 - change. Two schedules:

- ``sigma`` (ComfyUI core's rule): the threshold falls linearly in model timestep from 1 at the
  first sigma to 0 at ``max(last sigma, sigma_min)``; a pixel is free once ``change >= threshold``.
- ``step`` (the official rule): with N steps run, at step i (0-based) a pixel is held to the
  original (re-noised) while ``keep > i / N``, i.e. for its first ``keep * N`` steps, then free.

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


def step_free_mask(change: torch.Tensor, index: int, steps: int) -> torch.Tensor:
    """Binary free mask for the ``step`` schedule at step ``index`` of ``steps``.

    The official rule holds a pixel while ``keep > index / steps`` with ``keep = 1 - change``, so it
    is free when ``keep <= index / steps``. A pixel with keep 1 is held on every step (it ends
    exactly as the original); one with keep 0 is free from the first step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    keep = 1.0 - change
    return (keep <= index / steps).to(change.dtype)


def blend_strength(binary: torch.Tensor, change: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength`` < 1 mixes the binary mask with the soft map: ``s * binary + (1 - s) * change``.

    ``strength`` 1 (default) returns the binary mask; 0 returns the soft map (plain soft-mask
    inpainting). Core treats 0 like 1; we do not.
    """
    if strength >= 1:
        return binary
    return strength * binary + (1 - strength) * change
