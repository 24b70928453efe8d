"""FreeU's skip-feature filter: scale the low-frequency box of a feature map's 2-D spectrum.

Follows ChenyangSi/FreeU (MIT licence, Si et al., arXiv 2309.11497): FFT over the last two dims in
float32, the centred box ``[c - t, c + t)`` of the shifted spectrum (t = threshold, c = size // 2)
multiplied by ``scale``, inverse FFT, real part, cast back to the input dtype.

Written in our own words: instead of shifting the spectrum and allocating a full mask, the same box
is scaled in place in unshifted coordinates (frequencies ``-t .. t-1`` on each axis). Shifts are
exact permutations and multiplying by 1 is exact, so the result is bitwise the one of the
reference for every box that fits the map (2t <= size). A box wider than the map covers the whole
axis (the reference's slicing wraps negative starts there and shrinks the box instead).

Pure torch: no ComfyUI import.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Devices whose FFT failed once; later calls go straight to the CPU (a capability, not run state).
_CPU_FFT_DEVICES: set[str] = set()


def _pair(threshold) -> tuple[int, int]:
    if isinstance(threshold, (tuple, list)):
        th, tw = (int(v) for v in threshold)
    else:
        th = tw = int(threshold)
    if th < 1 or tw < 1:
        raise ValueError(f"fourier_filter: threshold must be >= 1 on both axes, got {threshold!r}")
    return th, tw


def box_slices(size: int, t: int) -> list[slice]:
    """Index ranges (unshifted FFT order) of the frequencies ``-t .. t-1`` on an axis of ``size``."""
    if 2 * t >= size:
        return [slice(0, size)]
    return [slice(0, t), slice(size - t, size)]


def fourier_filter(x: torch.Tensor, threshold=1, scale: float = 1.0) -> torch.Tensor:
    """Scale the centred low-frequency box (half-width ``threshold``) of ``x``'s spectrum by ``scale``.

    ``x``: [..., H, W] (any float dtype; computed in float32, returned in ``x.dtype``).
    ``threshold``: int, or (rows, cols) half-widths for a non-square box.
    ``scale == 1`` returns ``x`` itself: no FFT round trip, so the result is exact.
    """
    if scale == 1.0:
        return x
    th, tw = _pair(threshold)
    freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    H, W = freq.shape[-2], freq.shape[-1]
    for rows in box_slices(H, th):
        for cols in box_slices(W, tw):
            freq[..., rows, cols] *= scale
    out = torch.fft.ifftn(freq, dim=(-2, -1)).real
    return out.to(x.dtype)


def fourier_filter_any_device(x: torch.Tensor, threshold=1, scale: float = 1.0) -> torch.Tensor:
    """``fourier_filter`` with a CPU fallback for devices without torch.fft (MPS, DirectML): logged once."""
    if scale == 1.0:
        return x
    key = str(x.device)
    if key not in _CPU_FFT_DEVICES:
        try:
            return fourier_filter(x, threshold, scale)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if x.device.type == "cpu":
                raise
            _CPU_FFT_DEVICES.add(key)
            log.warning("FreeU: torch.fft is not available on %s (%s); filtering on the CPU from now on.",
                        key, exc)
    return fourier_filter(x.cpu(), threshold, scale).to(x.device)


def resolution_threshold(threshold: int, size: tuple[int, int], reference: tuple[int, int]) -> tuple[int, int]:
    """Box half-widths that keep the filtered band a fixed fraction of the feature map.

    ``size``/``reference``: (H, W) of the latent now and at the model's native resolution; every
    feature map of the U-Net scales with the latent, so ``threshold * size / reference`` (at least 1)
    makes e.g. a 1024px SD1.5 image filter the same band that threshold does at 512px.
    """
    th = max(1, int(round(threshold * size[0] / reference[0])))
    tw = max(1, int(round(threshold * size[1] / reference[1])))
    return th, tw
