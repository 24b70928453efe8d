"""FreeU's backbone factor on the first half of the decoder's backbone channels (v1 and v2).

v1 (paper): the first half of the channels times ``b``.
v2 (ChenyangSi/FreeU README, "structure-related scaling", 2023-10-18): per pixel
``(b - 1) * m + 1`` where ``m`` is the channel mean min-max normalised per sample.

The reference divides by ``max - min`` with no guard, so a flat mean map (a 1x1 feature map, or a
constant one) gives 0/0 = NaN. Here such a sample gets ``m = 1``: with no structure to rank, every
pixel gets the full factor, i.e. v2 reduces to v1. Every non-degenerate sample is computed with
exactly the reference's operations, so results there are bitwise unchanged.

Pure torch: no ComfyUI import. Acts in place on ``h`` (as the reference does) and returns it.
"""
from __future__ import annotations

import torch

VERSIONS = ("v2", "v1")


def structure_map(h: torch.Tensor) -> torch.Tensor:
    """v2's per-pixel weight in [0, 1]: channel mean, min-max normalised per sample. [B, 1, ...].

    The range is taken over the last two (spatial) dims, per sample and per every other dim: for a
    4-D map [B, C, H, W] that is the reference's per-sample range; a 5-D video map [B, C, T, H, W]
    is normalised per frame, exactly as the same frames time-batched ([B*T, C, H, W], SVD's layout).
    """
    mean = h.mean(1).unsqueeze(1)
    spatial = min(2, mean.dim() - 1)
    lead = mean.shape[:mean.dim() - spatial]
    flat = mean.reshape(*lead, -1)
    hmax = flat.max(dim=-1, keepdim=True)[0]
    hmin = flat.min(dim=-1, keepdim=True)[0]
    shape = tuple(lead) + (1,) * spatial
    spread = (hmax - hmin).view(shape)
    normalised = (mean - hmin.view(shape)) / spread
    return torch.where(spread > 0, normalised, torch.ones_like(normalised))


def scale_backbone(h: torch.Tensor, b: float, version: str = "v2") -> torch.Tensor:
    """Multiply ``h[:, :C//2]`` by FreeU's backbone factor, in place; returns ``h``. ``b == 1``: no-op."""
    if version not in VERSIONS:
        raise ValueError(f"scale_backbone: version must be one of {VERSIONS}, got {version!r}")
    if b == 1.0:
        return h
    half = h.shape[1] // 2
    if version == "v1":
        h[:, :half] = h[:, :half] * b
    else:
        h[:, :half] = h[:, :half] * ((b - 1) * structure_map(h) + 1)
    return h
