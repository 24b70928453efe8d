"""Change maps for Differential Diffusion: building them from images and fitting them to a latent.

Pure torch (no ComfyUI import). A change map is a float tensor in [0, 1], shape [B, H, W]
(ComfyUI's MASK layout). Conventions: ``white=change`` (ComfyUI's: 1 = change freely) and
``white=keep`` (the official code's: 1 = keep). Every function returns a new tensor; inputs are
never modified in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WHITE_CHANGE = "white=change"
WHITE_KEEP = "white=keep"
CONVENTIONS = (WHITE_CHANGE, WHITE_KEEP)

CHANNELS = ("luminance", "luminance_709", "red", "green", "blue", "alpha", "average")
# Rec. 601 luma as Pillow's "L" conversion computes it (what the official map loader uses,
# ``map.convert("L")``): 8-bit inputs, weights 299/587/114 in 16-bit fixed point, rounded to 8 bits.
PIL_L_WEIGHTS = (19595, 38470, 7471)
# Rec. 709 / sRGB luma weights (``luminance_709``).
LUMA_709_WEIGHTS = (0.2126, 0.7152, 0.0722)

RESIZE_BILINEAR = "bilinear"
RESIZE_AREA = "area"
RESIZE_MODES = (RESIZE_BILINEAR, RESIZE_AREA)


def check_finite(t: torch.Tensor) -> str | None:
    """None if every value is finite, else a short description of what is not (for error messages)."""
    if not torch.is_floating_point(t):
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    nan = int(torch.isnan(t).sum().item())
    inf = int(bad.sum().item()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return " and ".join(p for p in parts if p) + f" value(s) out of {t.numel()}"


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as [B, H, W] (accepts [H, W], [B, H, W] and [B, 1, H, W])."""
    if mask.dim() == 2:
        return mask.unsqueeze(0)
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"a mask must be [H, W], [B, H, W] or [B, 1, H, W]; got shape {tuple(mask.shape)}")
    return mask


def to_change(mask: torch.Tensor, convention: str) -> torch.Tensor:
    """The map in ComfyUI's white=change convention (a new tensor)."""
    if convention == WHITE_CHANGE:
        return mask.clone()
    if convention == WHITE_KEEP:
        return 1.0 - mask
    raise ValueError(f"unknown map convention {convention!r}; expected one of {CONVENTIONS}")


def aspect_mismatch(map_hw: tuple[int, int], latent_hw: tuple[int, int]) -> bool:
    """True when the map's aspect ratio differs from the latent's by more than one latent pixel."""
    mh, mw = map_hw
    lh, lw = latent_hw
    # width the latent would have at the map's aspect ratio, and height likewise
    return abs(lh * mw / mh - lw) > 1.0 or abs(lw * mh / mw - lh) > 1.0


def resize_to(mask: torch.Tensor, size: tuple[int, int], mode: str = RESIZE_BILINEAR) -> torch.Tensor:
    """Resize a [B, H, W] map to ``size`` (h, w), returning [B, 1, h, w].

    ``bilinear`` (default): bilinear interpolation without antialiasing, align_corners False; this
    is what the official code does (``torchvision.transforms.Resize(..., antialias=None)`` on a
    tensor) and what ComfyUI core does to a noise mask (``comfy.utils.reshape_mask``), bit for bit.
    ``area``: shrinking averages areas (each latent pixel gets the mean of the map pixels it
    covers, no aliasing of hard edges); enlarging interpolates bilinearly. Same size: an exact copy.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    m = as_batch(mask).unsqueeze(1).float()
    h, w = size
    if tuple(m.shape[-2:]) == (h, w):
        return m.clone()
    if mode == RESIZE_AREA and m.shape[-2] >= h and m.shape[-1] >= w:
        return F.interpolate(m, size=(h, w), mode="area")
    return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)


def pil_luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")`` of [..., 3] values in 0..1, returned in 0..1 (multiples of 1/255).

    The values are taken to 8 bits (``round(v * 255)``, exact for images loaded from 8-bit files),
    then ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`` as Pillow's ``rgb2l``.
    """
    q = torch.round(rgb.to(torch.float64).clamp(0.0, 1.0) * 255.0).to(torch.int64)
    w = torch.tensor(PIL_L_WEIGHTS, dtype=torch.int64, device=rgb.device)
    lum = ((q * w).sum(-1) + 0x8000) >> 16
    return (lum.to(torch.float32) / 255.0).to(rgb.dtype)


def extract_channel(image: torch.Tensor, channel: str) -> torch.Tensor:
    """One channel of an IMAGE [B, H, W, C] as [B, H, W].

    ``luminance``: Rec. 601 exactly as Pillow's "L" (the official loader; 8-bit steps).
    ``luminance_709``: Rec. 709 luma, unquantised. A one-channel image is returned as is.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    c = image.shape[-1]
    if channel in ("luminance", "luminance_709"):
        if c == 1:
            return image[..., 0].clone()
        if channel == "luminance":
            return pil_luminance(image[..., :3])
        w = torch.tensor(LUMA_709_WEIGHTS, dtype=image.dtype, device=image.device)
        return (image[..., :3] * w).sum(-1)
    if channel == "average":
        return image[..., : min(c, 3)].mean(-1)
    if channel not in ("red", "green", "blue", "alpha"):
        raise ValueError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
    index = {"red": 0, "green": 1, "blue": 2, "alpha": 3}[channel]
    if index >= c:
        raise ValueError(f"the image has {c} channel(s); it has no {channel} channel")
    return image[..., index].clone()


def gamma_contrast(mask: torch.Tensor, gamma: float = 1.0, contrast: float = 1.0) -> torch.Tensor:
    """``m ** gamma``, then contrast around mid-grey: ``(m - 0.5) * contrast + 0.5``; clamped to [0, 1]."""
    out = mask.clamp(0.0, 1.0)
    if gamma != 1.0:
        out = out.pow(gamma)
    if contrast != 1.0:
        out = (out - 0.5) * contrast + 0.5
    return out.clamp(0.0, 1.0)


def gaussian_kernel(radius: float) -> torch.Tensor:
    """1-D Gaussian of the given radius in pixels (sigma = radius / 2, taps out to +-radius)."""
    sigma = max(radius / 2.0, 1e-6)
    taps = int(math.ceil(radius))
    x = torch.arange(-taps, taps + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def blur(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """Separable Gaussian blur (feather) of a [B, H, W] map; edges are extended, so values stay in range."""
    if radius <= 0:
        return mask.clone()
    k = gaussian_kernel(radius).to(mask.device)
    taps = k.numel() // 2
    m = as_batch(mask).unsqueeze(1).float()
    m = F.pad(m, (taps, taps, 0, 0), mode="replicate")
    m = F.conv2d(m, k.view(1, 1, 1, -1))
    m = F.pad(m, (0, 0, taps, taps), mode="replicate")
    m = F.conv2d(m, k.view(1, 1, -1, 1))
    return m[:, 0].to(mask.dtype)


def quantise(mask: torch.Tensor, levels: int) -> torch.Tensor:
    """Round to ``levels`` evenly spaced values in [0, 1] (0, 1: unchanged)."""
    if levels < 2:
        return mask.clone()
    return torch.round(mask.clamp(0.0, 1.0) * (levels - 1)) / (levels - 1)


def build_change_map(source: torch.Tensor, *, is_image: bool, channel: str = "luminance",
                     invert: bool = False, gamma: float = 1.0, contrast: float = 1.0,
                     blur_radius: float = 0.0, levels: int = 0, low: float = 0.0,
                     high: float = 1.0) -> torch.Tensor:
    """The PlugKitChangeMap pipeline, in this order: channel, invert, gamma/contrast, blur, quantise, clamp.

    ``source`` is an IMAGE [B, H, W, C] (``is_image``) or a MASK; returns a [B, H, W] float map.
    """
    if low > high:
        raise ValueError(f"the clamp range is empty: low {low} > high {high}")
    m = extract_channel(source, channel) if is_image else as_batch(source).clone()
    m = m.float().clamp(0.0, 1.0)
    if invert:
        m = 1.0 - m
    m = gamma_contrast(m, gamma, contrast)
    m = blur(m, blur_radius)
    m = quantise(m, levels)
    return m.clamp(low, high)


def linear_gradient(height: int, width: int, direction: str = "left_to_right") -> torch.Tensor:
    """A [1, H, W] ramp from 0 to 1 (pixel centres), for tests and demo images."""
    if direction == "left_to_right":
        ramp = (torch.arange(width, dtype=torch.float32) + 0.5) / width
        return ramp.view(1, 1, width).expand(1, height, width).clone()
    if direction == "top_to_bottom":
        ramp = (torch.arange(height, dtype=torch.float32) + 0.5) / height
        return ramp.view(1, height, 1).expand(1, height, width).clone()
    raise ValueError(f"unknown direction {direction!r}")
