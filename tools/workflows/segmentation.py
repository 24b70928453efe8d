"""Writes the feature-segmentation workflow and its input images.

``python -m tools.workflows segmentation``. Writes
- ``workflows/input/plugkit_seg_train_1.png``, ``plugkit_seg_train_2.png``: two still lifes (drawn
  here, 512x512) whose alpha channel holds the painted mask of the fruit (transparent = painted, as
  ComfyUI's mask editor saves it, so LoadImage's MASK output is the class);
- ``workflows/input/plugkit_seg_target_1.png``, ``plugkit_seg_target_2.png``: two more still lifes
  to segment;
- ``workflows/segmentation_sd15.json`` (UI format): the two training images and their masks
  (batched with ImageBatch; masks via MaskToImage / ImageToMask) -> PlugKitFeatureSegmenterTrain
  (-> PlugKitSaveSegmenter); the two targets (ImageBatch) -> PlugKitFeatureSegment -> its mask ->
  PlugKitChangeMap (feathered, previewed) -> PlugKitDifferentialDiffusion -> KSampler -> VAEDecode ->
  SaveImage; plus the label image, the uncertainty and the targets saved beside the result.

User settings: SD1.5 (v1-5-pruned-emaonly.safetensors) at 512 px, the official recipe's defaults.
The workflow builder needs the server's /object_info, so this starts the real server once.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

from tools.harness.host import REPO

log = logging.getLogger("plugkit.workflows.segmentation")

SIZE = 512
TRAIN = ("plugkit_seg_train_1.png", "plugkit_seg_train_2.png")
TARGETS = ("plugkit_seg_target_1.png", "plugkit_seg_target_2.png")
WORKFLOW = "segmentation_sd15.json"
# (fruit centre x, y, radius) as shares of the size, one per picture: train 1, train 2, target 1, target 2
LAYOUTS = ((0.38, 0.52, 0.2), (0.62, 0.48, 0.16), (0.5, 0.55, 0.18), (0.3, 0.45, 0.14))


def still_life(cx: float, cy: float, r: float, size: int = SIZE) -> tuple[Image.Image, Image.Image]:
    """(RGB picture, L mask): a red apple with a leaf on a wooden table against a green wall."""
    img = Image.new("RGB", (size, size), (90, 140, 110))
    d = ImageDraw.Draw(img)
    table = int(size * 0.7)
    d.rectangle([0, table, size, size], fill=(150, 105, 60))
    for k in range(6):  # wood grain
        y = table + (k + 1) * (size - table) // 7
        d.line([(0, y), (size, y + (k % 2) * 6)], fill=(130, 90, 50), width=3)
    x, y, rad = cx * size, cy * size, r * size
    d.ellipse([x - rad, y + rad * 0.8, x + rad * 1.1, y + rad * 1.1], fill=(110, 78, 45))  # shadow
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    box = [x - rad, y - rad, x + rad, y + rad]
    d.ellipse(box, fill=(200, 30, 40))
    md.ellipse(box, fill=255)
    d.ellipse([x - rad * 0.55, y - rad * 0.6, x - rad * 0.15, y - rad * 0.2], fill=(245, 140, 140))  # highlight
    return img, mask


def painted(img: Image.Image, mask: Image.Image) -> Image.Image:
    """RGBA with alpha = 255 - mask: ComfyUI's LoadImage turns transparency into MASK = 1."""
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(255 - np.asarray(mask)))
    return rgba


def build(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    t1 = wf.add("LoadImage", title="Training image 1 (fruit painted in the mask editor)", image=TRAIN[0])
    t2 = wf.add("LoadImage", title="Training image 2 (fruit painted in the mask editor)", image=TRAIN[1])
    images = wf.add("ImageBatch", image1=t1[0], image2=t2[0])
    m1 = wf.add("MaskToImage", mask=t1[1])
    m2 = wf.add("MaskToImage", mask=t2[1])
    mask_batch = wf.add("ImageToMask", image=wf.add("ImageBatch", image1=m1[0], image2=m2[0])[0], channel="red")
    train = wf.add("PlugKitFeatureSegmenterTrain", model=ckpt[0], vae=ckpt[2], images=images[0], masks=mask_batch[0],
                   steps="50, 150, 250", blocks="", ensemble_size=10, resolution="latent", batch_size=64,
                   max_epochs=100, seed=0)
    wf.add("PlugKitSaveSegmenter", segmenter=train[0], name="plugkit_fruit", overwrite=True)
    g1 = wf.add("LoadImage", title="Image to segment 1", image=TARGETS[0])
    g2 = wf.add("LoadImage", title="Image to segment 2", image=TARGETS[1])
    targets = wf.add("ImageBatch", image1=g1[0], image2=g2[0])
    seg = wf.add("PlugKitFeatureSegment", segmenter=train[0], model=ckpt[0], vae=ckpt[2], images=targets[0],
                 class_index=1)
    cmap = wf.add("PlugKitChangeMap", title="Change map: the fruit changes, feathered", mask=seg[0],
                  channel="luminance", invert=False, gamma=1.0, contrast=1.0, blur_radius=8.0, levels=0,
                  min_value=0.0, max_value=1.0)
    wf.add("PreviewImage", title="Change map preview", images=cmap[1])
    enc = wf.add("VAEEncode", pixels=targets[0], vae=ckpt[2])
    dd = wf.add("PlugKitDifferentialDiffusion", model=ckpt[0], samples=enc[0], change_map=cmap[0], strength=1.0,
                map_convention="white=change", schedule="sigma", exact_keep=False)
    pos = wf.add("CLIPTextEncode", title="Positive", clip=ckpt[1], text="a ripe orange on a wooden table, photo")
    neg = wf.add("CLIPTextEncode", title="Negative", clip=ckpt[1], text="blurry, low quality")
    ks = wf.add("KSampler", model=dd[0], positive=pos[0], negative=neg[0], latent_image=dd[1],
                seed=42, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", title="Segmented region re-generated", images=dec[0], filename_prefix="plugkit_segmentation")
    wf.add("SaveImage", title="Segmentation (labels)", images=seg[2], filename_prefix="plugkit_seg_labels")
    wf.add("SaveImage", title="Uncertainty", images=wf.add("MaskToImage", mask=seg[3])[0],
           filename_prefix="plugkit_seg_uncertainty")
    wf.add("SaveImage", title="Targets (off)", images=targets[0], filename_prefix="plugkit_seg_targets")
    return wf


def write_images() -> None:
    inputs = REPO / "workflows" / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, layout in zip(TRAIN, LAYOUTS[:2]):
        painted(*still_life(*layout)).save(inputs / name, optimize=True)
    for name, layout in zip(TARGETS, LAYOUTS[2:]):
        still_life(*layout)[0].save(inputs / name, optimize=True)


def workflows(info: dict) -> dict:
    return {WORKFLOW: build(info)}
