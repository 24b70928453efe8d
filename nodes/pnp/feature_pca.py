"""PCA renderings of U-Net features and self-attention, as in the Plug-and-Play paper (Fig. 3-4).

Pure torch (no ComfyUI import). Each spatial position is a sample; its feature vector (or its row
of the self-attention matrix) is projected on the first three principal components, which become
the R, G and B channels (each min-max normalised to [0, 1]).
"""
from __future__ import annotations

import torch


def principal_components(samples: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Project ``samples`` (N, D) on their first ``k`` principal components -> (N, k).

    Computed in float64 by SVD of the centred samples; signs are fixed so that each component's
    largest-magnitude loading is positive (deterministic colours). Missing components (D or N < k)
    are zero.
    """
    if samples.dim() != 2:
        raise ValueError(f"expected (N, D) samples, got shape {tuple(samples.shape)}")
    x = samples.double()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    out = torch.zeros(n, k, dtype=torch.float64, device=x.device)
    if n < 2 or d < 1:
        return out.float()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    m = min(k, vh.shape[0])
    comps = vh[:m]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(m), idx])
    signs[signs == 0] = 1
    comps = comps * signs[:, None]
    out[:, :m] = x @ comps.T
    return out.float()


def normalise_channels(img: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each channel of (..., C) to [0, 1] (a flat channel becomes 0.5)."""
    flat = img.reshape(-1, img.shape[-1])
    lo = flat.min(dim=0).values
    hi = flat.max(dim=0).values
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = (img - lo) / safe
    return torch.where(span > 0, out, torch.full_like(out, 0.5)).clamp(0, 1)


def feature_pca_image(features: torch.Tensor) -> torch.Tensor:
    """(C, H, W) features -> (H, W, 3) image in [0, 1] of the first three principal components."""
    if features.dim() != 3:
        raise ValueError(f"expected (C, H, W) features, got shape {tuple(features.shape)}")
    c, h, w = features.shape
    comps = principal_components(features.reshape(c, h * w).T, 3)
    return normalise_channels(comps.reshape(h, w, 3))


def self_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) of one item: q, k (N, heads*d) -> (N, N)."""
    n, inner = q.shape
    d = inner // heads
    qh = q.double().reshape(n, heads, d).transpose(0, 1)
    kh = k.double().reshape(k.shape[0], heads, d).transpose(0, 1)
    attn = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
    return attn.mean(dim=0).float()


def attention_pca_image(q: torch.Tensor, k: torch.Tensor, heads: int, height: int, width: int) -> torch.Tensor:
    """PCA image (H, W, 3) of the rows of the head-averaged self-attention matrix of one item."""
    if q.shape[0] != height * width:
        raise ValueError(f"{q.shape[0]} tokens do not form a {height}x{width} map")
    comps = principal_components(self_attention(q, k, heads), 3)
    return normalise_channels(comps.reshape(height, width, 3))


def upscale_nearest(img: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, W, C) -> (H*factor, W*factor, C), nearest neighbour (crisp feature cells)."""
    if factor <= 1:
        return img
    return img.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
