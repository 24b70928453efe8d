"""Deterministic DDIM inversion in ComfyUI's sigma space, and the stored source trajectory.

Pure torch (no ComfyUI import): the model enters only through an ``eps_fn`` callable.

Sigma space. ComfyUI's samplers work on ``x = x0 + sigma * eps`` (the VP latent of the DDPM papers
divided by ``sqrt(alpha_bar)``, with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``). In that space a
deterministic DDIM step between two noise levels is one Euler step,
``x(sigma_to) = x(sigma_from) + (sigma_to - sigma_from) * eps``, in both directions.

Official inversion (MichalGeyer/pnp-diffusers ``preprocess.py``): from the latent at the lower level
``t_prev``, the U-Net is evaluated with the *higher* timestep ``t`` (its input being the VP latent at
``t_prev``), and that eps moves the latent up to ``t``. ``eps_fn(x, sigma_from, sigma_to)`` must
return exactly that prediction; the node glue builds it from the model's own ``model_sampling`` so
epsilon and v-prediction models both work.

Start. The official code (``preprocess.py``, diffusers ``DDIMScheduler`` with
``set_alpha_to_one=False``) treats the clean latent as the latent at ``alphas_cumprod[0]``, i.e. at
the model's lowest noise level ``sigma_min`` (0.0292 for SD), not at sigma 0: its first step goes
from ``final_alpha_cumprod = alphas_cumprod[0]`` to the first timestep. In sigma space that latent is
``clean * sqrt(1 + sigma_min**2)`` (so the U-Net's VP input is the clean latent itself).

Resolution. The official code inverts with 999 fine steps (every model timestep) and samples with
50: here each interval of the sampling schedule is subdivided uniformly in the model's timestep
(``interval_substeps``: ``round(dt * inversion_steps / 999)`` steps for an interval spanning ``dt``
timesteps, so ``inversion_steps = 999`` is one step per model timestep), and only the latents at
the sampling schedule's points are kept.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

EpsFn = Callable[[torch.Tensor, float, float], torch.Tensor]

OFFICIAL_INVERSION_STEPS = 999  # preprocess.py --steps default ("for the best reconstruction")
TIMESTEP_SPAN = 999.0  # model timesteps 0..999


def interval_substeps(t_points: Iterable[float], inversion_steps: int) -> list[int]:
    """Inversion steps per interval of an ascending timestep list: ``max(1, round(dt * N / 999))``.

    Uniform in the model's timestep over the whole range: ``N = 999`` gives one step per model
    timestep (the official ``preprocess.py``), ``N`` = the sampling steps one step per interval of
    ``ddim_uniform``.
    """
    if inversion_steps < 1:
        raise ValueError("inversion_steps must be >= 1")
    t = [float(v) for v in t_points]
    return [max(1, int(round((b - a) * inversion_steps / TIMESTEP_SPAN))) for a, b in zip(t[:-1], t[1:])]


def subdivide_schedule(
    coarse: torch.Tensor,
    substeps,
    to_t: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    to_sigma: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, list[int]]:
    """Refine an ascending sigma schedule; returns ``(fine, coarse_positions)``.

    ``coarse`` ascends (e.g. ``[sigma_min, s_1, ..., s_max]``). ``substeps`` is one count for
    every interval or a list with one count per interval. Each interval ``[a, b]`` with ``a > 0`` is
    split into that many steps uniform in the model's timestep (``to_t``/``to_sigma``; without
    them, uniform in log sigma); an interval starting at sigma 0 is always one step. Timesteps
    within 1e-6 of an integer are rounded to it (the model's own timesteps). Every coarse point is
    kept exactly; ``fine[coarse_positions[i]] == coarse[i]``.
    """
    coarse = torch.as_tensor(coarse, dtype=torch.float32).flatten()
    if coarse.numel() < 2:
        raise ValueError("a schedule needs at least two sigmas")
    if bool((coarse[1:] <= coarse[:-1]).any()):
        raise ValueError("the schedule must be strictly ascending")
    counts = [int(substeps)] * (coarse.numel() - 1) if isinstance(substeps, (int, float)) else [int(c) for c in substeps]
    if len(counts) != coarse.numel() - 1:
        raise ValueError(f"{len(counts)} substep counts for {coarse.numel() - 1} intervals")
    if min(counts) < 1:
        raise ValueError("substeps must be >= 1")
    points = [coarse[0:1]]
    positions = [0]
    for i in range(coarse.numel() - 1):
        a, b = coarse[i], coarse[i + 1]
        n_sub = counts[i]
        if n_sub > 1 and float(a) > 0.0:
            if to_t is not None and to_sigma is not None:
                ta = to_t(a.reshape(1)).double()
                tb = to_t(b.reshape(1)).double()
                ts = ta + (tb - ta) * torch.linspace(0, 1, n_sub + 1, dtype=torch.float64)[1:-1]
                ts = torch.where((ts - ts.round()).abs() < 1e-6, ts.round(), ts)
                inner = to_sigma(ts.float()).float().flatten()
            else:
                la, lb = torch.log(a.double()), torch.log(b.double())
                inner = torch.exp(la + (lb - la) * torch.linspace(0, 1, n_sub + 1, dtype=torch.float64)[1:-1]).float()
            inner = inner[(inner > a) & (inner < b)]
            inner = torch.unique(inner)  # sorted ascending
            points.append(inner)
        points.append(b.reshape(1))
        positions.append(sum(p.numel() for p in points) - 1)
    return torch.cat(points), positions


@torch.no_grad()
def ddim_invert(
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    eps_fn: EpsFn,
    keep: Optional[Iterable[int]] = None,
    callback: Optional[Callable[[int, int], None]] = None,
    fixed_point_iterations: int = 0,
) -> dict[int, torch.Tensor]:
    """Invert ``x0`` (the latent at ``sigmas[0]``) up an ascending schedule.

    Returns ``{i: latent at sigmas[i]}`` for every ``i`` in ``keep`` (default: only the last).
    ``callback(step, total)`` is called after every step.

    ``fixed_point_iterations`` (k): the official step evaluates eps at the lower level, while the
    DDIM sampling step that should undo it evaluates eps at the higher level; that mismatch is why
    the official code needs 999 small steps. Each iteration re-solves the step with eps taken at the
    current estimate of the higher-level latent, ``x_hi <- x_lo + (hi - lo) * eps(x_hi, hi)``: the
    fixed point is exactly the latent that one DDIM sampling step takes back to ``x_lo``. Each
    iteration costs one model evaluation per step (``steps * (1 + k)`` in all).
    """
    if fixed_point_iterations < 0:
        raise ValueError("fixed_point_iterations must be >= 0")
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    n = len(sig) - 1
    keep_set = set(range(n + 1)) if keep == "all" else set(keep if keep is not None else [n])
    out: dict[int, torch.Tensor] = {}
    x = x0
    if 0 in keep_set:
        out[0] = x0.clone()
    for i in range(n):
        lo, hi = sig[i], sig[i + 1]
        eps = eps_fn(x, lo, hi)
        x_hi = x + (hi - lo) * eps
        for _ in range(fixed_point_iterations):
            x_hi = x + (hi - lo) * eps_fn(x_hi, hi, hi)
        x = x_hi
        if i + 1 in keep_set:
            out[i + 1] = x
        if callback is not None:
            callback(i + 1, n)
    return out


class SourceTrajectory:
    """The inverted source latents at the sampling schedule's sigmas (sampler space).

    ``sigmas`` descend (``[s_max, ..., 0]``, the order a sampler visits them); ``latents[i]`` is the
    source latent at ``sigmas[i]`` (``latents[-1]`` the clean latent). ``at(sigma)`` returns the
    stored latent exactly when ``sigma`` is on the schedule (relative tolerance ``rtol``), else the
    point on the chord between the two stored neighbours, linear in sigma. Within one DDIM step the
    inverted trajectory *is* linear in sigma (``x + (sigma - sigma_i) * eps``), so the chord is exact
    when each interval was inverted in one step and a close approximation otherwise (the error is
    measured in the tests and the benchmark). Above the top sigma the top interval is extended.
    """

    def __init__(self, sigmas: torch.Tensor, latents: torch.Tensor, rtol: float = 1e-5):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if latents.shape[0] != sigmas.numel():
            raise ValueError(f"{latents.shape[0]} latents for {sigmas.numel()} sigmas")
        if sigmas.numel() < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()):
            raise ValueError("trajectory sigmas must strictly descend and hold at least two points")
        self.sigmas = sigmas
        self.latents = latents
        self.rtol = float(rtol)

    @property
    def shape(self) -> torch.Size:
        """Shape of one latent (batch, channels, height, width)."""
        return self.latents.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.latents.device

    def to(self, device=None, dtype=None) -> "SourceTrajectory":
        """A trajectory whose latents live on ``device`` (self when already there)."""
        lat = self.latents.to(device=device, dtype=dtype)
        if lat is self.latents:
            return self
        return SourceTrajectory(self.sigmas, lat, self.rtol)

    def nbytes(self) -> int:
        return self.latents.numel() * self.latents.element_size()

    def index_of(self, sigma: float) -> Optional[int]:
        """Index of the stored point at ``sigma`` (relative tolerance), or None."""
        s = float(sigma)
        diff = (self.sigmas - s).abs()
        i = int(diff.argmin())
        if float(diff[i]) <= self.rtol * max(abs(s), 1e-8) or (s == 0.0 and float(self.sigmas[i]) == 0.0):
            return i
        return None

    def at(self, sigma: float) -> torch.Tensor:
        """The source latent at ``sigma`` (exact on the schedule, chord interpolation off it)."""
        i = self.index_of(sigma)
        if i is not None:
            return self.latents[i]
        s = float(sigma)
        sig = self.sigmas
        if s > float(sig[0]):
            hi, lo = 0, 1
        elif s < float(sig[-1]):
            return self.latents[-1]
        else:
            lo = int((sig < s).nonzero()[0])  # first stored sigma below s
            hi = lo - 1
        s_hi, s_lo = float(sig[hi]), float(sig[lo])
        w = (s - s_lo) / (s_hi - s_lo)
        return self.latents[lo] + (self.latents[hi] - self.latents[lo]) * w


def step_index(sigma: float, sample_sigmas: torch.Tensor) -> int:
    """The sampling step a model call at ``sigma`` belongs to.

    The largest ``i`` with ``sample_sigmas[i] >= sigma`` (relative tolerance 1e-5): exact step
    sigmas map to their own step, intermediate evaluations (Heun, DPM++ 2S) to the step they start.
    """
    s = float(sigma)
    sig = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
    ok = (sig >= s - 1e-5 * max(abs(s), 1e-8)).nonzero()
    if ok.numel() == 0:
        return 0
    return int(ok[-1])


def injection_steps(n_steps: int, share: float) -> int:
    """How many of the first steps get injection: ``int(n_steps * share)`` exactly as the official
    ``pnp.py`` (Python float product, truncated: ``int(100 * 0.29) == 28``)."""
    if share <= 0.0:
        return 0
    return max(0, min(n_steps, int(n_steps * share)))


def schedule_offset(run_sigmas, traj_sigmas, rtol: float = 1e-5) -> Optional[int]:
    """Where a sampling run's sigmas sit on the trajectory's schedule, or None when they do not.

    Accepted: ``run_sigmas[:-1]`` are consecutive points of ``traj_sigmas`` starting at the
    returned index, and the last sigma is either the next point or 0 (a run that ends early with
    ``force_full_denoise``, or a sampler that drops the penultimate sigma). Anything else (another
    scheduler, step count, denoise < 1) is off the schedule.
    """
    run = [float(s) for s in torch.as_tensor(run_sigmas).flatten().cpu()]
    traj = [float(s) for s in torch.as_tensor(traj_sigmas).flatten().cpu()]
    if len(run) < 2:
        return None

    def same(a: float, b: float) -> bool:
        return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-8)

    starts = [j for j, s in enumerate(traj[:-1]) if same(s, run[0])]
    if not starts:
        return None
    j = starts[0]
    body = run[:-1]
    if j + len(body) > len(traj) - 1:
        return None
    if not all(same(a, traj[j + k]) for k, a in enumerate(body)):
        return None
    last = run[-1]
    if same(last, traj[j + len(body)]) or last == 0.0:
        return j
    return None


def describe_sigmas(sigmas, head: int = 3) -> str:
    """``[14.61, 10.86, 8.13, ... 0.0292, 0]`` (n steps): a short, readable schedule."""
    v = [float(s) for s in torch.as_tensor(sigmas).flatten().cpu()]

    def f(x: float) -> str:
        return "0" if x == 0 else f"{x:.4g}"

    if len(v) <= 2 * head + 1:
        body = ", ".join(f(x) for x in v)
    else:
        body = ", ".join(f(x) for x in v[:head]) + ", ..., " + ", ".join(f(x) for x in v[-2:])
    return f"[{body}] ({len(v) - 1} steps)"


# Two-stage samplers of comfy/k_diffusion/sampling.py: step i evaluates the model at sigma_i, calls
# the step callback, then evaluates again. Some of those extra evaluations land exactly on sigma_(i+1)
# (heun, heunpp2; dpm_2_ancestral and dpmpp_2s_ancestral at eta 1, whose midpoint between sigma_i and
# sigma_down = sigma_(i+1)^2 / sigma_i is sigma_(i+1)), where sigma alone would count them as step i+1.
_ONE_EXTRA = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
              "dpmpp_sde_gpu"}


def extra_evaluations(sampler_name: str, run_sigmas) -> Optional[list[int]]:
    """For each step of a run, how many model evaluations follow the step's callback (they belong
    to that step); None for samplers that evaluate once per step or only strictly between sigmas.

    ``heun``, ``dpm_2``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``: one, except in a
    step that ends at sigma 0 (Euler). ``heunpp2``: none when sigma_(i+1) is the last sigma, one
    when sigma_(i+2) is, else two.
    """
    sig = [float(s) for s in torch.as_tensor(run_sigmas).flatten().cpu()]
    n = len(sig) - 1
    name = sampler_name.removeprefix("sample_")
    if name in _ONE_EXTRA:
        return [0 if sig[i + 1] == 0 else 1 for i in range(n)]
    if name == "heunpp2":
        end = sig[-1]
        return [0 if sig[i + 1] == end else (1 if sig[i + 2] == end else 2) for i in range(n)]
    return None
