"""Writes the Plug-and-Play workflow and its input image.

``python -m tools.workflows pnp``. Writes
- ``workflows/input/pnp_source.png``: a test picture (drawn here, 512x512);
- ``workflows/pnp_sd15.json`` (UI format): LoadImage -> VAEEncode -> PlugKitPnPInvert (empty
  prompt for the inversion and the source branch) -> PlugKitPnPInject -> KSamplerAdvanced (ddim, ddim_uniform,
  add_noise disabled) with a target and a negative prompt -> VAEDecode -> SaveImage, plus a
  PlugKitFeatureMap -> PreviewImage. The official settings: 50 DDIM steps, cfg 7.5, the official
  negative prompt, injection 0.8 / 0.5, 1000 inversion evaluations (the official 999, rounded to 20
  per sampling step), the empty prompt for the source branch.

The workflow builder needs the server's /object_info, so this starts the real server once.
"""
from __future__ import annotations

import logging

from PIL import Image, ImageDraw

from tools.harness.host import REPO

log = logging.getLogger("plugkit.workflows.pnp")

SIZE = 512
SOURCE = "pnp_source.png"
WORKFLOW = "pnp_sd15.json"
STEPS = 50  # the official sampling steps (tests and the demo shorten the run on a CPU)
INVERSION_STEPS = 1000  # the official 999 inversion steps, as a whole number (20) per sampling step


def source_image(size: int = SIZE) -> Image.Image:
    """A still life: a red apple with a leaf on a wooden table against a green wall (flat colours)."""
    img = Image.new("RGB", (size, size), (90, 140, 110))
    d = ImageDraw.Draw(img)
    s = size / 128
    d.rectangle([0, 88 * s, 128 * s, 128 * s], fill=(150, 105, 60))
    d.line([(0, 88 * s), (128 * s, 88 * s)], fill=(110, 75, 40), width=max(1, int(2 * s)))
    d.ellipse([36 * s, 98 * s, 96 * s, 110 * s], fill=(110, 78, 45))  # shadow
    d.ellipse([38 * s, 46 * s, 90 * s, 104 * s], fill=(200, 30, 40))
    d.ellipse([48 * s, 56 * s, 60 * s, 70 * s], fill=(245, 140, 140))  # highlight
    d.line([(64 * s, 50 * s), (68 * s, 36 * s)], fill=(80, 50, 20), width=max(1, int(3 * s)))
    d.ellipse([68 * s, 34 * s, 86 * s, 44 * s], fill=(60, 150, 50))  # leaf
    return img


def build(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    src = wf.add("LoadImage", title="Source image", image=SOURCE)
    enc = wf.add("VAEEncode", pixels=src[0], vae=ckpt[2])
    empty = wf.add("CLIPTextEncode", title="Inversion prompt (empty, as the official code)", clip=ckpt[1], text="")
    inv = wf.add("PlugKitPnPInvert", model=ckpt[0], samples=enc[0], conditioning=empty[0], steps=STEPS,
                 inversion_steps=INVERSION_STEPS, scheduler="ddim_uniform", inversion_resolution="inversion_steps",
                 source_prompt=empty[0])  # the source branch's prompt: empty, as the official code
    inj = wf.add("PlugKitPnPInject", model=ckpt[0], pnp_source=inv[0], feature_injection=0.8,
                 attention_injection=0.5, feature_blocks="", attention_blocks="", source_mode="in-batch")
    pos = wf.add("CLIPTextEncode", title="Target prompt", clip=ckpt[1],
                 text="a photo of a golden orange on a wooden table")
    neg = wf.add("CLIPTextEncode", title="Negative prompt (official)", clip=ckpt[1],
                 text="ugly, blurry, black, low res, unrealistic")
    ks = wf.add("KSamplerAdvanced", model=inj[0], positive=pos[0], negative=neg[0], latent_image=inv[1],
                add_noise="disable", noise_seed=0, steps=STEPS, cfg=7.5, sampler_name="ddim",
                scheduler="ddim_uniform", start_at_step=0, end_at_step=10000,
                return_with_leftover_noise="disable")
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", title="Plug-and-Play result", images=dec[0], filename_prefix="plugkit_pnp")
    fmap = wf.add("PlugKitFeatureMap", title="Source features (decoder block 4, first step)", model=ckpt[0],
                  pnp_source=inv[0], block=-1, step=0, kind="features")
    wf.add("PreviewImage", title="Feature map preview", images=fmap[0])
    return wf


def write_images() -> None:
    inputs = REPO / "workflows" / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    source_image().save(inputs / SOURCE, optimize=True)


def workflows(info: dict) -> dict:
    return {WORKFLOW: build(info)}
