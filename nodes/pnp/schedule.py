"""The sigma schedules of a PnP source: the inversion's schedule, built from the sampling schedule,
and the check that a sampling run stays on it.

Pure torch (no ComfyUI import): the model enters only through its ``model_sampling`` object.
"""
from __future__ import annotations

import logging

import torch

from .ddim_inversion import describe_sigmas, interval_substeps, schedule_offset, subdivide_schedule

log = logging.getLogger(__name__)


def input_scale(model_sampling, sigma_from: float, sigma_to: float) -> float:
    """Factor that makes the model see a latent at ``sigma_from`` while told ``sigma_to``."""
    one = torch.ones(1)
    a = model_sampling.calculate_input(torch.tensor([float(sigma_from)]), one)
    b = model_sampling.calculate_input(torch.tensor([float(sigma_to)]), one)
    return float(a / b)


def timestep_warp(model_sampling):
    """(sigma -> timestep, timestep -> sigma) on the CPU, wherever the model's buffers live."""
    buffers = list(model_sampling.buffers()) if isinstance(model_sampling, torch.nn.Module) else []
    device = buffers[0].device if buffers else torch.device("cpu")

    def to_t(sigma):
        return model_sampling.timestep(sigma.to(device)).float().cpu()

    def to_sigma(t):
        return model_sampling.sigma(t.to(device)).float().cpu()

    return to_t, to_sigma


def check_sigmas(sigmas, node: str) -> torch.Tensor:
    """A connected SIGMAS input as a CPU float list ending at 0, or a clear error."""
    s = torch.as_tensor(sigmas).detach().float().cpu().flatten()
    if s.numel() < 2 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s[1:] >= s[:-1]).any()):
        raise ValueError(
            f"{node}: input 'sigmas' must be a strictly decreasing list of at least two finite sigmas >= 0 "
            f"(a scheduler node's SIGMAS); got {describe_sigmas(s) if s.numel() else '[]'}."
        )
    if float(s[-1]) > 0:
        s = torch.cat([s, s.new_zeros(1)])  # the trajectory always ends at the clean latent
    return s


def trajectory_sigmas(coarse: torch.Tensor, schedule_name: str, steps: int, node: str) -> torch.Tensor:
    """The sampling schedule's positive sigmas (descending) and a final 0: the trajectory's points."""
    keep_desc = torch.cat([coarse[:-1][coarse[:-1] > 0], coarse.new_zeros(1)])
    if keep_desc.numel() < 2 or bool((keep_desc[1:] >= keep_desc[:-1]).any()):
        raise ValueError(f"{node}: the {schedule_name} schedule for {steps} steps is not strictly decreasing; pick another scheduler or step count.")
    return keep_desc


def inversion_schedule(model_sampling, keep_desc: torch.Tensor, inversion_steps: int, node: str = "PlugKitPnPInvert"):
    """(ascending coarse points, fine inversion sigmas, positions of the coarse points in ``fine``).

    ``keep_desc``: the sampling schedule's sigmas (descending, ending with 0). The inversion starts
    where the official one does: the clean latent sits at ``alphas_cumprod[0]``, the model's
    ``sigma_min`` (a schedule reaching below it starts at sigma 0). Each interval gets
    ``interval_substeps`` steps, uniform in the model's timestep.
    """
    positive = keep_desc[:-1].flip(0)
    sigma_start = float(model_sampling.sigma_min)
    lowest = float(positive[0])
    if abs(lowest - sigma_start) <= 1e-5 * sigma_start:
        ascending = positive
    elif lowest > sigma_start:
        ascending = torch.cat([positive.new_tensor([sigma_start]), positive])
    else:
        log.info("%s: the schedule goes below sigma_min %.4g; inverting from sigma 0", node, sigma_start)
        ascending = torch.cat([positive.new_zeros(1), positive])
    to_t, to_sigma = timestep_warp(model_sampling)
    t_points = to_t(ascending)
    if float(ascending[0]) == 0.0:
        t_points[0] = 0.0
    fine, positions = subdivide_schedule(ascending, interval_substeps(t_points, inversion_steps), to_t, to_sigma)
    return ascending, fine, positions


def check_schedule(source, noise: torch.Tensor, sigmas, node: str) -> int:
    """The run's offset on the source trajectory, or a clear error when the run leaves it."""
    traj = source.trajectory
    fix = (f"sample with scheduler '{source.scheduler}' and {source.steps} steps (KSamplerAdvanced: add_noise "
           f"disable, start_at_step 0; KSampler always adds noise; dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 "
           f"drop a sigma there), or connect the sampler's SIGMAS (SamplerCustom) to PlugKitPnPInvert's 'sigmas' "
           f"input so the source is inverted on exactly them")
    if source.scheduler == "custom SIGMAS":
        fix = ("sample with the SIGMAS that were connected to PlugKitPnPInvert (SamplerCustom, add_noise off), or "
               "connect the sampler's own SIGMAS there")
    if noise is not None and torch.is_tensor(noise) and bool(torch.count_nonzero(noise)):
        raise ValueError(
            f"{node}: the sampler adds noise to the inverted latent (KSampler, or add_noise enabled), so the run "
            f"leaves the source's trajectory and the injected features belong to another image. Fix: "
            f"KSamplerAdvanced with add_noise 'disable' (SamplerCustom: add_noise off)."
        )
    sig = torch.as_tensor(sigmas).detach().float().cpu().flatten()
    offset = schedule_offset(sig, traj.sigmas)
    if offset is None:
        raise ValueError(
            f"{node}: the sampler's sigmas {describe_sigmas(sig)} are not on the schedule 'pnp_source' was "
            f"inverted on ({source.scheduler}: {describe_sigmas(traj.sigmas)}); the source latents exist only at "
            f"the inversion's sigmas. Fix: {fix}."
        )
    return offset
