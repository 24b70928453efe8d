"""The official Diff-Plugin sampler, in ComfyUI's sampler convention (torch and numpy, no ComfyUI import).

Diff-Plugin's ``infer.py`` samples with diffusers' ``UniPCMultistepScheduler`` configured from SD 1.4's
scheduler config: multistep UniPC with the B(h) = e^h - 1 variant ("bh2"), order 2, data (x0)
prediction, the UniC corrector after every step but the first, first order on the first and the last
step, on the integer timesteps ``linspace(0, 999, N + 1).round()`` reversed without the 0, ending at
t = 0 (sigma_min, not sigma 0). ComfyUI's own ``uni_pc_bh2`` is order 3 on its scheduler's sigma grid,
so it lands somewhere slightly different; this module reproduces the official solver.

The update is written in ComfyUI's variance-exploding form x = x_vp / alpha (sigma = sqrt((1 - a) / a),
the same sigma diffusers uses): with r = sigma_t / sigma_s and lambda = -log(sigma), diffusers'
``x_t = (sigma_vp_t / sigma_vp_s) x_s - alpha_t (e^-h - 1) m0 - alpha_t B(h) res`` becomes
``x_t = r x_s - (r - 1) m0 - B(h) res``, with B(h) = r - 1 for bh2.

Re-noising: ``infer.py`` (and ``demo.py``) set ``latents = add_noise(scb_cond, noise, t)`` at *every*
step with t >= ``--time_threshold`` (960), not only the first: for 20 steps that is t = 999 only, for
26 steps t = 999 and 961, for 50 steps t = 999 and 979. diffusers' UniPC corrector rebuilds the
sample from its stored previous sample, so a re-noised latent changes only what the model is
evaluated on (and the x0 conversion of that output), not the solver state; ``sample_official_unipc``
does the same with ``renoise``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

TRAIN_TIMESTEPS = 1000
TIME_THRESHOLD = 960  # infer.py / demo.py --time_threshold: the input is re-noised at every t >= this


def official_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' UniPC ``set_timesteps``: ``np.linspace(0, 999, steps + 1).round()[::-1][:-1]``, duplicates
    dropped; e.g. 20 steps -> 999, 949, 899, ..., 50. numpy's linspace, not torch's: their last-bit
    differences decide halves (26 steps: numpy gives 499.49999..., torch 499.5000...1, so t = 499 vs 500)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    grid = np.linspace(0, train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    out: list[int] = []
    for t in grid.tolist():
        if t not in out:
            out.append(int(t))
    return out


def official_sigmas(sigma_of_t: Callable[[torch.Tensor], torch.Tensor], steps: int) -> torch.Tensor:
    """The sigmas of the official timesteps, then sigma(t = 0) (the official last step ends there)."""
    ts = torch.tensor(official_timesteps(steps) + [0], dtype=torch.float32)
    return sigma_of_t(ts).float()


def renoise_flags(timesteps: list[int], threshold: int = TIME_THRESHOLD) -> list[bool]:
    """Per step: does infer.py replace the latent by the noised input there (``t >= time_threshold``)?"""
    return [int(t) >= threshold for t in timesteps]


def _b_vector(hh: torch.Tensor, order: int) -> list[torch.Tensor]:
    """b_i = h phi_{i+1}(hh) i! / B(h) for i = 1..order (diffusers' recurrence, bh2)."""
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b


def _update(x_s: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor, m0: torch.Tensor,
            res: torch.Tensor | float) -> torch.Tensor:
    ratio = sigma_t / sigma_s
    return ratio * x_s - (ratio - 1) * m0 - (ratio - 1) * res  # bh2: B(h) = e^(-h) - 1 = ratio - 1


@torch.no_grad()
def sample_official_unipc(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None,
                          disable=None, renoise: list[bool] | tuple = (), renoise_latent: torch.Tensor | None = None,
                          renoise_noise: torch.Tensor | None = None) -> torch.Tensor:
    """A ComfyUI sampler function (``comfy.samplers.KSAMPLER(sample_official_unipc)``): ``model(x, sigma)``
    returns the denoised prediction. ``sigmas`` should be ``official_sigmas`` (any decreasing grid
    ending above 0 works; a final 0 is not supported, as in the official solver with sigma_min).

    ``renoise[k]`` true: the model is evaluated at step k on ``renoise_latent + sigma_k * renoise_noise``
    (infer.py's ``add_noise(scb_cond, noise, t)`` in this form) instead of the current sample; the
    solver state is unchanged by it, as in diffusers (see the module docstring)."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    if n < 1:
        return x
    if float(sigmas[-1]) <= 0:
        raise ValueError("the official UniPC sampler ends at sigma_min; the last sigma must be above 0")
    renoise = list(renoise)
    if any(renoise) and (renoise_latent is None or renoise_noise is None):
        raise ValueError("re-noising needs renoise_latent and renoise_noise")
    s_in = x.new_ones([x.shape[0]])
    lam = [-math.log(float(s)) for s in sigmas]
    outputs: list[torch.Tensor] = []  # data predictions m_0 .. m_k
    last_x = None
    last_order = 0
    for k in range(n):
        if k < len(renoise) and renoise[k]:
            x_eval = renoise_latent + renoise_noise * sigmas[k]
            if k == 0:
                x = x_eval  # the first latent (nothing to correct yet)
        else:
            x_eval = x
        m_k = model(x_eval, sigmas[k] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": m_k})
        if k > 0:  # UniC: correct x_k with the new output (the model is not evaluated again)
            x = _corrector(last_x, x, m_k, outputs, sigmas, lam, k, last_order)
        outputs.append(m_k)
        order = min(2, n - k, k + 1)  # warm-up at the first step, first order at the last
        last_x = x
        last_order = order
        x = _predictor(x, outputs, sigmas, lam, k, order)
    return x


def _predictor(x, outputs, sigmas, lam, k, order):
    """UniP from sigma_k to sigma_{k+1}."""
    m0 = outputs[-1]
    h = lam[k + 1] - lam[k]
    res = 0.0
    if order == 2:
        rk = (lam[k - 1] - lam[k]) / h
        d1 = (outputs[-2] - m0) / rk
        res = 0.5 * d1  # diffusers fixes rho = 0.5 for the order-2 predictor
    return _update(x, sigmas[k], sigmas[k + 1], m0, res)


def _corrector(last_x, x_k, m_k, outputs, sigmas, lam, k, order):
    """UniC: redo the step sigma_{k-1} -> sigma_k with the output at sigma_k (order of that step)."""
    m0 = outputs[-1]  # output at sigma_{k-1}
    h = lam[k] - lam[k - 1]
    if order == 1:
        rhos = [0.5]  # diffusers fixes rho = 0.5 for the first-order corrector
        d1s = []
    else:
        rk = (lam[k - 2] - lam[k - 1]) / h
        d1s = [(outputs[-2] - m0) / rk]
        # R = [[1, 1], [rk, 1]] rho = b
        r = torch.tensor([[1.0, 1.0], [rk, 1.0]], dtype=torch.float64)
        b = torch.stack(_b_vector(torch.tensor(-h, dtype=torch.float64), 2))
        rhos = torch.linalg.solve(r, b).tolist()
    res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (m_k - m0)
    return _update(last_x, sigmas[k - 1], sigmas[k], m0, res)


def official_start(cond_latent: torch.Tensor, noise: torch.Tensor, sigma0: float, from_noise: bool) -> torch.Tensor:
    """The first latent of infer.py in ComfyUI's form (x = x_vp / alpha): the degraded latent noised
    to t = 999 with ``add_noise`` (x0 + sigma * noise), or pure noise for the tasks that start from
    noise (diffusers' unit-variance noise, i.e. sqrt(1 + sigma^2) * noise here)."""
    if from_noise:
        return noise * math.sqrt(1.0 + sigma0 * sigma0)
    return cond_latent + noise * sigma0


def official_finish(x: torch.Tensor, sigma_last: float) -> torch.Tensor:
    """infer.py decodes diffusers' latent at t = 0, alpha_0 * x (alpha_0 = 0.99957 for SD)."""
    return x / math.sqrt(1.0 + sigma_last * sigma_last)
