"""Writes the Diff-Plugin workflows and their input images (the random-weight models they name are
test fixtures: tools/fixtures/diff_plugin_models.py).

``python -m tools.workflows diff_plugin``. Writes
- ``workflows/input/diffplugin_rain.png`` and ``diffplugin_rain_haze.png``: small degraded pictures
  (drawn here, 512x512, the size the released plugins expect: a house under rain streaks, the second
  also hazy);
- ``workflows/diff_plugin_derain.json`` (UI format): CheckpointLoaderSimple, CLIPVisionLoader,
  PlugKitTaskPluginLoader (derain), LoadImage -> PlugKitApplyTaskPlugin -> KSampler (cfg 1, UniPC,
  20 steps, close to the official inference) -> VAEDecode -> SaveImage, and beside it
  PlugKitRunPluginChain (the same plugin, official sampler: exactly the official inference) -> SaveImage;
- ``workflows/diff_plugin_selector.json``: three loaders (derain, desnow, dehaze) ->
  PlugKitPluginSelector (instruction) -> PlugKitRunPluginChain -> SaveImage.
"""
from __future__ import annotations

import logging

from PIL import Image, ImageDraw, ImageFilter

from tools.fixtures.diff_plugin_models import CLIP_VISION_NAME, SELECTOR, TASKS
from tools.harness.host import REPO

log = logging.getLogger("plugkit.workflows.diff_plugin")

SIZE = 512
RAIN = "diffplugin_rain.png"
RAIN_HAZE = "diffplugin_rain_haze.png"
DERAIN_WORKFLOW = "diff_plugin_derain.json"
SELECTOR_WORKFLOW = "diff_plugin_selector.json"
STEPS = 20  # the official inference steps (UniPC); tests and the demo shorten the run on a CPU
CHAIN_STEPS = 20  # the chain's first plugin (official 20; each later one 3)


# --- images ---------------------------------------------------------------------------------------

def clean_image(size: int = SIZE) -> Image.Image:
    """A red-roofed house on grass under a blue sky (flat colours)."""
    img = Image.new("RGB", (size, size), (120, 170, 230))
    d = ImageDraw.Draw(img)
    s = size / 64
    d.rectangle([0, 44 * s, 64 * s, 64 * s], fill=(70, 140, 60))
    d.rectangle([18 * s, 28 * s, 46 * s, 48 * s], fill=(230, 220, 190))
    d.polygon([(14 * s, 30 * s), (32 * s, 14 * s), (50 * s, 30 * s)], fill=(180, 40, 40))
    d.rectangle([28 * s, 36 * s, 35 * s, 48 * s], fill=(100, 60, 30))
    d.ellipse([48 * s, 4 * s, 60 * s, 16 * s], fill=(250, 230, 90))
    return img


def add_rain(img: Image.Image, seed: int = 0) -> Image.Image:
    import random

    rng = random.Random(seed)
    layer = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(layer)
    w, h = img.size
    s = w / 64  # drawn at 64 px originally: same streak density and width at every size
    for _ in range(int(w * h / 40 / (s * s))):
        x, y = rng.uniform(-10 * s, w), rng.uniform(-10 * s, h)
        length = rng.uniform(4, 9) * s
        d.line([(x, y), (x + length * 0.35, y + length)], fill=rng.randint(120, 220), width=max(1, round(s)))
    layer = layer.filter(ImageFilter.GaussianBlur(0.4 * s))
    return Image.composite(Image.new("RGB", img.size, (235, 235, 245)), img, layer)


def add_haze(img: Image.Image, amount: float = 0.45) -> Image.Image:
    return Image.blend(img, Image.new("RGB", img.size, (200, 200, 205)), amount)


def write_images() -> None:
    inputs = REPO / "workflows" / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    add_rain(clean_image()).save(inputs / RAIN, optimize=True)
    add_haze(add_rain(clean_image(), seed=1)).save(inputs / RAIN_HAZE, optimize=True)


# --- workflows ------------------------------------------------------------------------------------

# The shipped pictures are 64 px drawings so the workflows run on CPU in the tests: 'none' keeps them at
# 64 px. For real photos set 'resize' to infer.py (the nodes' default, the official rule).
TEST_PICTURE_RESIZE = "none"

def build_derain(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    cv = wf.add("CLIPVisionLoader", title="CLIP ViT-L/14 vision", clip_name=CLIP_VISION_NAME)
    plugin = wf.add("PlugKitTaskPluginLoader", title="Task-Plugin (released folder models/diff_plugin/derain)",
                    plugin_name="derain")
    img = wf.add("LoadImage", title="Degraded image", image=RAIN)
    apply = wf.add("PlugKitApplyTaskPlugin", model=ckpt[0], plugin=plugin[0], clip_vision=cv[0], vae=ckpt[2],
                   image=img[0], strength=1.0, start="official (per task)", resize=TEST_PICTURE_RESIZE)
    neg = wf.add("CLIPTextEncode", title="Unused negative (cfg 1 runs the positive only)", clip=ckpt[1], text="")
    ks = wf.add("KSampler", title="KSampler (cfg 1, UniPC 20 steps: close to the official inference)",
                model=apply[0], positive=apply[1], negative=neg[0], latent_image=apply[2], seed=42, steps=STEPS,
                cfg=1.0, sampler_name="uni_pc_bh2", scheduler="normal", denoise=1.0)
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", title="Derained (graph route)", images=dec[0], filename_prefix="plugkit_diffplugin_derain")
    official = wf.add("PlugKitRunPluginChain", title="Official sampling, exactly (one plugin)", model=ckpt[0],
                      plugin=plugin[0], clip_vision=cv[0], vae=ckpt[2], image=img[0], seed=42, steps=STEPS,
                      later_steps=3, sampler_name="official", scheduler="normal", start="official (per task)",
                      resize=TEST_PICTURE_RESIZE)
    wf.add("SaveImage", title="Derained (official sampling)", images=official[0],
           filename_prefix="plugkit_diffplugin_derain_official")
    return wf


def build_selector(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    cv = wf.add("CLIPVisionLoader", title="CLIP ViT-L/14 vision", clip_name=CLIP_VISION_NAME)
    loaders = [wf.add("PlugKitTaskPluginLoader", title=f"Task-Plugin {task}", plugin_name=task) for task in TASKS]
    img = wf.add("LoadImage", title="Degraded image (rain and haze)", image=RAIN_HAZE)
    sel = wf.add("PlugKitPluginSelector", clip=ckpt[1], clip_vision=cv[0], image=img[0],
                 instruction="remove the rain and the haze", selector_name=SELECTOR, rule="official (score > 0)",
                 **{f"plugin_{i + 1}": loader[0] for i, loader in enumerate(loaders)})
    chain = wf.add("PlugKitRunPluginChain", title="Run Plugin Chain (official sampler: first plugin 20 steps, later ones 3)",
                   model=ckpt[0], plugins=sel[0], clip_vision=cv[0], vae=ckpt[2],
                   image=img[0], seed=42, steps=CHAIN_STEPS, later_steps=3, sampler_name="official",
                   scheduler="normal", start="official (per task)", resize=TEST_PICTURE_RESIZE)
    wf.add("SaveImage", title="Result of the selected plugins", images=chain[0],
           filename_prefix="plugkit_diffplugin_selector")
    return wf


def workflows(info: dict) -> dict:
    return {DERAIN_WORKFLOW: build_derain(info), SELECTOR_WORKFLOW: build_selector(info)}
