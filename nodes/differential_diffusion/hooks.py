"""What ComfyUI calls while sampling with Differential Diffusion: the denoise-mask function.

``DenoiseMaskSchedule`` goes into ``model_options["denoise_mask_function"]`` (``attach`` sets it
on a cloned model, replacing any earlier one with a warning); ComfyUI's sampler calls it before
every model evaluation. The per-step masks themselves are ``mask_schedule``'s. Imports nothing
from ComfyUI: it reads the model's ``model_sampling`` from what the sampler hands it.
"""
from __future__ import annotations

import logging

import torch

from .mask_schedule import (
    blend_strength,
    sigma_free_mask,
    sigma_threshold,
    step_free_mask,
    step_index,
)

log = logging.getLogger(__name__)

SCHEDULES = ("sigma", "step")


class DenoiseMaskSchedule:
    """The denoise-mask function (``model_options["denoise_mask_function"]``).

    Called by ComfyUI's sampler before every model evaluation with the current sigma, the latent's
    noise mask (white = change, already at latent size) and ``extra_options`` holding the sampler's
    ``sigmas`` (the steps actually run) and the wrapped model. Uses only the model's
    ``model_sampling`` (sigma <-> timestep), never its network, so it works for U-Nets and DiTs.
    Stateless between calls: the step index is derived from ``sigmas`` and the current sigma.
    """

    def __init__(self, schedule: str = "sigma", strength: float = 1.0, exact_keep: bool = False,
                 total_steps: int = 0, first_step: int = 0):
        self.schedule = schedule
        self.strength = float(strength)
        self.exact_keep = bool(exact_keep)
        self.total_steps = int(total_steps)
        self.first_step = int(first_step)

    def __repr__(self) -> str:
        return (f"DenoiseMaskSchedule(schedule={self.schedule!r}, strength={self.strength}, "
                f"exact_keep={self.exact_keep}, total_steps={self.total_steps}, first_step={self.first_step})")

    def __call__(self, sigma: torch.Tensor, denoise_mask: torch.Tensor, extra_options: dict) -> torch.Tensor:
        sigmas = extra_options["sigmas"]
        if self.schedule == "step":
            run = max(len(sigmas) - 1, 1)
            index = step_index(sigma.flatten()[0], sigmas)
            last = index == run - 1
            if self.total_steps > 0:  # global thresholds: this run is steps first_step.. of total_steps
                index, steps = self.first_step + index, self.total_steps
            else:
                steps = run
            binary = step_free_mask(denoise_mask, index, steps, self.exact_keep, last_of_run=last)
        else:
            sampling = extra_options["model"].inner_model.model_sampling
            sigma_to = sampling.sigma_min
            if sigmas[-1] > sigma_to:
                sigma_to = sigmas[-1]
            threshold = sigma_threshold(
                sampling.timestep(sigma[0]), sampling.timestep(sigmas[0]), sampling.timestep(sigma_to)
            )
            binary = sigma_free_mask(denoise_mask, threshold, self.exact_keep)
        return blend_strength(binary, denoise_mask, self.strength)


def attach(m, schedule: DenoiseMaskSchedule, node: str) -> None:
    """Set ``schedule`` as the cloned model ``m``'s denoise-mask function (an earlier one is replaced, logged)."""
    previous = m.model_options.get("denoise_mask_function")
    if previous is not None:
        log.warning(
            "%s: the model already has a denoise mask function (%r, e.g. from core Differential "
            "Diffusion); it is replaced. Apply only one Differential Diffusion node per model.",
            node, previous,
        )
    if schedule.schedule != "step" and (schedule.total_steps or schedule.first_step):
        log.warning("%s: total_steps and first_step apply to schedule 'step' only; ignored for %r.",
                    node, schedule.schedule)
    m.set_model_denoise_mask_function(schedule)
