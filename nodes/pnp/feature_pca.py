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


ATTENTION_CHUNK_BYTES = 32 * 2**20  # one chunk of attention rows being computed (float64, all heads)
ATTENTION_MATRIX_BYTES = 64 * 2**20  # keep the head-averaged N x N matrix (float32) up to this size


def _fix_signs(comps: torch.Tensor) -> torch.Tensor:
    """Signs of (k, D) components as in ``principal_components``: the largest-magnitude loading > 0."""
    m = comps.shape[0]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(m), idx])
    signs[signs == 0] = 1
    return signs


def attention_principal_components(q: torch.Tensor, k: torch.Tensor, heads: int, n_comp: int = 3,
                                   chunk_bytes: int = ATTENTION_CHUNK_BYTES,
                                   matrix_bytes: int = ATTENTION_MATRIX_BYTES, block: int = 8,
                                   basis_bytes: int = 64 * 2**20, max_passes: int = 400,
                                   tol: float = 1e-12, seed: int = 0) -> torch.Tensor:
    """``principal_components(self_attention(q, k, heads), n_comp)`` in bounded memory.

    The rows of the head-averaged attention matrix A (N x N) are computed in chunks of at most
    ``chunk_bytes`` (float64 scores of all heads); A itself is kept (float32, as ``self_attention``
    returns it) only when it fits ``matrix_bytes``, otherwise every pass recomputes its chunks. The
    top components of X = A minus its column mean are found by block Lanczos on X^T X (``block``
    vectors per pass, full reorthogonalisation, restarted from the best Ritz vectors when the basis
    would exceed ``basis_bytes``), stopped when the top ``n_comp`` Ritz values change by less than
    ``tol`` (relative); the projections X V are then the first ``n_comp`` PCA coordinates, with the
    signs of ``principal_components``. Memory: one chunk + the kept matrix (if it fits) + the basis.
    """
    n, inner = q.shape
    n_keys = k.shape[0]
    d = inner // heads
    out = torch.zeros(n, n_comp, dtype=torch.float64)
    if n < 2:
        return out.float()
    qh = q.double().reshape(n, heads, d).transpose(0, 1) / d ** 0.5
    kh = k.double().reshape(n_keys, heads, d).transpose(0, 1)
    rows = max(1, int(chunk_bytes) // (2 * heads * n_keys * 8))  # scores + softmax of one chunk

    def computed():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            yield start, stop, torch.softmax(qh[:, start:stop] @ kh.transpose(1, 2), dim=-1).mean(dim=0)

    kept = None
    if n * n_keys * 4 <= matrix_bytes:
        kept = torch.empty(n, n_keys, dtype=torch.float32)
        for start, stop, a in computed():
            kept[start:stop] = a

    def chunks():
        if kept is None:
            yield from computed()
        else:
            big = max(rows, int(chunk_bytes) // (n_keys * 8))
            for start in range(0, n, big):
                yield start, min(n, start + big), kept[start:start + big].double()

    mean = torch.zeros(n_keys, dtype=torch.float64)
    for _, _, a in chunks():
        mean += a.sum(dim=0)
    mean /= n

    def gram(v):  # X^T X v, one pass
        z = torch.zeros_like(v)
        for _, _, a in chunks():
            x = a - mean
            z += x.T @ (x @ v)
        return z

    r = max(1, min(block, n_keys))
    max_blocks = max(2, int(basis_bytes) // (2 * n_keys * r * 8))
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(n_keys, r, generator=g, dtype=torch.float64)).Q
    basis, images, previous, vecs = [], [], None, None
    for _ in range(max_passes):
        z = gram(v)
        basis.append(v)
        images.append(z)
        bm, zm = torch.cat(basis, 1), torch.cat(images, 1)
        h = bm.T @ zm
        w, e = torch.linalg.eigh((h + h.T) / 2)
        order = torch.argsort(w, descending=True)
        top = w[order[:n_comp]]
        vecs = bm @ e[:, order[:max(n_comp, r)]]
        if previous is not None and top.numel() == previous.numel() and bool(
                ((top - previous).abs() <= tol * top.abs().clamp_min(1e-300)).all()):
            break
        previous = top
        if len(basis) >= max_blocks or bm.shape[1] + r > n_keys:  # restart from the best Ritz vectors
            basis, images, previous = [], [], None  # (the restart's own Ritz values equal the last ones)
            v = torch.linalg.qr(vecs[:, :r]).Q
            continue
        z = z - bm @ (bm.T @ z)
        z = z - bm @ (bm.T @ z)
        v, rr = torch.linalg.qr(z)
        if float(rr.diagonal().abs().max()) <= 1e-14 * max(float(top.abs().max()), 1e-300):
            break  # the Krylov space is exhausted: the Ritz vectors are exact
    m = min(n_comp, vecs.shape[1])
    comps = vecs[:, :m].T  # (m, N): the right singular vectors of X
    proj = torch.empty(n, m, dtype=torch.float64)
    for start, stop, a in chunks():
        proj[start:stop] = (a - mean) @ comps.T
    out[:, :m] = proj * _fix_signs(comps)
    return out.float()


def attention_pca_image(q: torch.Tensor, k: torch.Tensor, heads: int, height: int, width: int,
                        **bounds) -> torch.Tensor:
    """PCA image (H, W, 3) of the rows of the head-averaged self-attention matrix of one item
    (computed in bounded memory: ``attention_principal_components``)."""
    if q.shape[0] != height * width:
        raise ValueError(f"{q.shape[0]} tokens do not form a {height}x{width} map")
    comps = attention_principal_components(q, k, heads, 3, **bounds)
    return normalise_channels(comps.reshape(height, width, 3))


def upscale_nearest(img: torch.Tensor, factor: int) -> torch.Tensor:
    """(H, W, C) -> (H*factor, W*factor, C), nearest neighbour (crisp feature cells)."""
    if factor <= 1:
        return img
    return img.repeat_interleave(factor, dim=0).repeat_interleave(factor, dim=1)
