"""Writes the Differential Diffusion workflow, its input images and the docs picture.

``python -m tools.workflows differential_diffusion``. Writes
- ``workflows/input/plugkit_dd_source.png``: a test picture (drawn here, 512x512);
- ``workflows/input/plugkit_dd_gradient.png``: a left-to-right black-to-white gradient (512x512);
- ``workflows/differential_diffusion_sd15.json`` (UI format): LoadImage -> VAEEncode; gradient ->
  PlugKitChangeMap; PlugKitDifferentialDiffusion; KSampler; VAEDecode; SaveImage (plus the source
  saved beside it, the "off" picture of the demo's comparison sheet). The official settings
  (SD2/run.py): 100 steps, guidance 7, its negative prompt, the official step rule;
- ``docs/differential_diffusion_conventions.png``: the two map conventions side by side.

The workflow builder needs the server's /object_info, so this starts the real server once.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

from tools.harness.host import REPO

log = logging.getLogger("plugkit.workflows.differential_diffusion")

SIZE = 512
SOURCE = "plugkit_dd_source.png"
GRADIENT = "plugkit_dd_gradient.png"
WORKFLOW = "differential_diffusion_sd15.json"
DOCS_PICTURE = "differential_diffusion_conventions.png"


def source_image(size: int = SIZE) -> Image.Image:
    """A simple scene: sky, sun, hills and a house (flat colours, drawn with PIL)."""
    img = Image.new("RGB", (size, size), (120, 170, 230))
    d = ImageDraw.Draw(img)
    s = size / 128
    d.ellipse([90 * s, 12 * s, 116 * s, 38 * s], fill=(250, 220, 80))
    d.polygon([(0, 80 * s), (40 * s, 55 * s), (80 * s, 78 * s), (128 * s, 60 * s), (128 * s, 128 * s), (0, 128 * s)],
              fill=(70, 150, 70))
    d.rectangle([22 * s, 70 * s, 58 * s, 104 * s], fill=(200, 80, 60))
    d.polygon([(18 * s, 72 * s), (40 * s, 52 * s), (62 * s, 72 * s)], fill=(110, 60, 40))
    d.rectangle([34 * s, 86 * s, 44 * s, 104 * s], fill=(80, 50, 30))
    return img


def gradient_image(size: int = SIZE) -> Image.Image:
    """Left (black) to right (white), as an 8-bit grey image."""
    ramp = ((np.arange(size) + 0.5) / size * 255).round().astype(np.uint8)
    return Image.fromarray(np.tile(ramp, (size, 1)), mode="L")


def conventions_picture(cell: int = 160) -> Image.Image:
    """Docs figure: one map read under white=change and under white=keep."""
    grad = gradient_image(cell).convert("RGB")
    pad, head = 12, 22
    w = 3 * cell + 4 * pad
    h = cell + 2 * head + 2 * pad + 18
    out = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(out)
    titles = ["the change map", "white=change (ComfyUI)", "white=keep (official code)"]
    for i, title in enumerate(titles):
        x = pad + i * (cell + pad)
        d.text((x, pad), title, fill="black")
        y = pad + head
        if i == 0:
            out.paste(grad, (x, y))
            d.text((x, y + cell + 4), "black 0  ->  white 1", fill="black")
            continue
        # amount of change, red = changes fully, blue = kept
        change = np.asarray(gradient_image(cell), dtype=np.float32) / 255.0
        if i == 2:
            change = 1.0 - change
        rgb = np.stack([change, np.zeros_like(change), 1.0 - change], -1) * 220 + 20
        out.paste(Image.fromarray(rgb.astype(np.uint8)), (x, y))
        left, right = ("keeps", "changes") if i == 1 else ("changes", "keeps")
        d.text((x, y + cell + 4), f"left {left}, right {right}", fill="black")
    d.text((pad, h - 16), "blue = kept as the input, red = free to change from the first step", fill=(90, 90, 90))
    return out


def build(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    src = wf.add("LoadImage", title="Source image", image=SOURCE)
    grad = wf.add("LoadImage", title="Gradient (left keep, right change)", image=GRADIENT)
    enc = wf.add("VAEEncode", pixels=src[0], vae=ckpt[2])
    cmap = wf.add("PlugKitChangeMap", image=grad[0], channel="luminance", blur_radius=0.0, levels=0)
    wf.add("PreviewImage", title="Change map preview", images=cmap[1])
    dd = wf.add("PlugKitDifferentialDiffusion", model=ckpt[0], samples=enc[0], change_map=cmap[0],
                strength=1.0, map_convention="white=change", schedule="step")
    pos = wf.add("CLIPTextEncode", title="Positive", clip=ckpt[1],
                 text="a watercolour painting of a house on a hill, sunny day")
    neg = wf.add("CLIPTextEncode", title="Negative (official)", clip=ckpt[1],
                 text="blurry, shadow polaroid photo, scary angry pose")
    ks = wf.add("KSampler", title="KSampler (official: 100 steps, cfg 7)", model=dd[0], positive=pos[0],
                negative=neg[0], latent_image=dd[1], seed=42, steps=100, cfg=7.0, sampler_name="euler",
                scheduler="normal", denoise=1.0)
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", title="Differential Diffusion result", images=dec[0],
           filename_prefix="plugkit_differential_diffusion")
    wf.add("SaveImage", title="Source (off)", images=src[0], filename_prefix="plugkit_dd_source")
    return wf


def write_images() -> None:
    inputs = REPO / "workflows" / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    source_image().save(inputs / SOURCE, optimize=True)
    gradient_image().save(inputs / GRADIENT, optimize=True)
    (REPO / "docs").mkdir(exist_ok=True)
    conventions_picture().save(REPO / "docs" / DOCS_PICTURE, optimize=True)


def workflows(info: dict) -> dict:
    return {WORKFLOW: build(info)}
