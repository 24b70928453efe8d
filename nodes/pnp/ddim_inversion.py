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

Resolution. The official code inverts with 999 fine steps and samples with 50: here each interval
of the sampling schedule is subdivided into ``substeps`` inversion steps (uniform in the model's
timestep), and only the latents at the sampling schedule's points are kept.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

EpsFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def substeps_for(steps: int, inversion_steps: int) -> int:
    """Inversion steps per sampling interval: ``round(inversion_steps / steps)``, at least 1."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return max(1, int(round(inversion_steps / steps)))


def subdivide_schedule(
    coarse: torch.Tensor,
    substeps: int,
    to_t: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    to_sigma: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, list[int]]:
    """Refine an ascending sigma schedule; returns ``(fine, coarse_positions)``.

    ``coarse`` ascends (e.g. ``[0, s_1, ..., s_max]``). Each interval ``[a, b]`` with ``a > 0`` is
    split into ``substeps`` steps uniform in the model's timestep (``to_t``/``to_sigma``; without
    them, uniform in log sigma). The interval starting at sigma 0 is one step, as in the official
    code (whose first step goes from the clean latent to the first timestep). Every coarse point is
    kept exactly; ``fine[coarse_positions[i]] == coarse[i]``.
    """
    coarse = torch.as_tensor(coarse, dtype=torch.float32).flatten()
    if coarse.numel() < 2:
        raise ValueError("a schedule needs at least two sigmas")
    if bool((coarse[1:] <= coarse[:-1]).any()):
        raise ValueError("the schedule must be strictly ascending")
    if substeps < 1:
        raise ValueError("substeps must be >= 1")
    points = [coarse[0:1]]
    positions = [0]
    for i in range(coarse.numel() - 1):
        a, b = coarse[i], coarse[i + 1]
        if substeps > 1 and float(a) > 0.0:
            if to_t is not None and to_sigma is not None:
                ta = to_t(a.reshape(1)).double()
                tb = to_t(b.reshape(1)).double()
                ts = ta + (tb - ta) * torch.linspace(0, 1, substeps + 1, dtype=torch.float64)[1:-1]
                inner = to_sigma(ts.float()).float().flatten()
            else:
                la, lb = torch.log(a.double()), torch.log(b.double())
                inner = torch.exp(la + (lb - la) * torch.linspace(0, 1, substeps + 1, dtype=torch.float64)[1:-1]).float()
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
) -> dict[int, torch.Tensor]:
    """Invert ``x0`` (at ``sigmas[0]``, normally 0) up an ascending schedule.

    Returns ``{i: latent at sigmas[i]}`` for every ``i`` in ``keep`` (default: only the last).
    ``callback(step, total)`` is called after every step.
    """
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
        x = x + (hi - lo) * eps
        if i + 1 in keep_set:
            out[i + 1] = x
        if callback is not None:
            callback(i + 1, n)
    return out


@torch.no_grad()
def ddim_sample(x: torch.Tensor, sigmas: torch.Tensor, denoise_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """Deterministic DDIM down a descending schedule (``denoise_fn(x, sigma) -> x0 estimate``)."""
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    for hi, lo in zip(sig[:-1], sig[1:]):
        eps = (x - denoise_fn(x, hi)) / hi
        x = x + (lo - hi) * eps
    return x


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
    """How many of the first steps get injection: ``int(n_steps * share)`` as the official code."""
    if share <= 0.0:
        return 0
    return min(n_steps, int(n_steps * share + 1e-9))
