"""The official Diff-Plugin input resizing (yuhaoliu7456/Diff-Plugin ``infer.py`` and ``demo.py``); no
ComfyUI import.

Both scripts hand a PIL image to diffusers' ``VaeImageProcessor.preprocess(image, height, width)``,
which resizes (Lanczos, not a crop) to the next lower multiple of 8 of each side. Before that:

- ``infer.py``: if either side is under 512, the short side becomes 512 and the long side
  ``int((512 / short) * long)`` (PIL's default ``resize`` filter, bicubic); else the size is kept.
- ``demo.py``: the short side always becomes ``image_resolution`` (512), the long side likewise
  (so large photos are scaled down), also with PIL's default filter.

The CLIP input (TPB) is the original image in both scripts; only the VAE/SCB input is resized.
``resize_image`` runs the same two PIL resizes on 8-bit pixels, so an image read from a file
(ComfyUI's Load Image gives exact 8-bit values) gets exactly the pixels the official scripts feed
the VAE.
"""
from __future__ import annotations

import numpy as np
import torch

RESIZE_INFER = "infer.py"
RESIZE_DEMO = "demo.py"
RESIZE_NONE = "none"
RESIZE_RULES = (RESIZE_INFER, RESIZE_DEMO, RESIZE_NONE)
OFFICIAL_RESOLUTION = 512  # infer.py's threshold, demo.py's default image_resolution
VAE_SCALE = 8


def _short_side_to(width: int, height: int, target: int) -> tuple[int, int]:
    """The scripts' arithmetic, literally: the short side -> target, the other int((target / short) * long)."""
    if width < height:
        return target, int((target / width) * height)
    return int((target / height) * width), target


def first_resize(width: int, height: int, rule: str) -> tuple[int, int]:
    """Size after the script's own PIL resize (before diffusers' multiple-of-8 resize)."""
    if rule == RESIZE_INFER:
        if width < OFFICIAL_RESOLUTION or height < OFFICIAL_RESOLUTION:
            return _short_side_to(width, height, OFFICIAL_RESOLUTION)
        return width, height
    if rule == RESIZE_DEMO:
        return _short_side_to(width, height, OFFICIAL_RESOLUTION)
    if rule == RESIZE_NONE:
        return width, height
    raise ValueError(f"unknown resize rule {rule!r}; use one of {RESIZE_RULES}")


def official_size(width: int, height: int, rule: str) -> tuple[int, int]:
    """(width, height) of the image the VAE encodes; the latent is this / 8. ``none`` keeps the size
    (ComfyUI's VAE then crops to multiples of 8)."""
    w, h = first_resize(width, height, rule)
    if rule == RESIZE_NONE:
        return w, h
    return w - w % VAE_SCALE, h - h % VAE_SCALE


def to_pil(image: torch.Tensor):
    """One IMAGE [H, W, C] in 0..1 -> an 8-bit RGB PIL image (rounded, as a file would hold it)."""
    from PIL import Image

    pixels = (image[..., :3].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def from_pil(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def resize_image(image: torch.Tensor, rule: str) -> torch.Tensor:
    """IMAGE batch [B, H, W, C] -> [B, H', W', 3] resized as the official script ``rule`` does for its
    VAE input. Unchanged (not even quantised) when the rule keeps the size."""
    from PIL import Image

    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; use one of {RESIZE_RULES}")
    height, width = int(image.shape[1]), int(image.shape[2])
    first = first_resize(width, height, rule)
    final = official_size(width, height, rule)
    if rule == RESIZE_NONE or (first == (width, height) and final == first):
        return image[..., :3]
    out = []
    for one in image:
        pil = to_pil(one)
        if first != pil.size:
            pil = pil.resize(first)  # the scripts' image.resize((w, h)): PIL's default filter (bicubic)
        if final != pil.size:
            pil = pil.resize(final, resample=Image.Resampling.LANCZOS)  # VaeImageProcessor.resize
        out.append(from_pil(pil))
    return torch.stack(out).to(image.device)


def quantize_8bit(image: torch.Tensor) -> torch.Tensor:
    """What demo.py's chain does between plugins: the decoded result goes through
    ``VaeImageProcessor.postprocess(output_type='pil')`` (8-bit, rounded) before the next plugin."""
    return (image.clamp(0, 1) * 255.0).round() / 255.0
