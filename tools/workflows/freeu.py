"""FreeU's workflows (``python -m tools.workflows freeu`` writes them):

- ``workflows/freeu_sd15.json``: checkpoint -> PlugKitFreeU -> KSampler -> decode -> save, beside
  the same sampler on the plain model (no FreeU node at all), so one run shows off vs on. The
  user's settings: SD1.5 at 512x512, 50 steps, cfg 7.5 (what the official code runs: diffusers'
  defaults), the official SD1.5 factors. Tests and the demo shorten it on the CPU as they queue it.
- ``workflows/freeu_sdxl.json``: the same graph for SDXL base at 1024x1024 (diffusers' SDXL
  defaults: 50 steps, cfg 5) with the preset picked by family. On the test tier the random SD1.5
  checkpoint stands in under the SDXL file name (no SDXL-sized random checkpoint fits there).

The widget layout comes from a real server's /object_info, so the files match what the frontend saves.
"""
from __future__ import annotations

from tools.fixtures.models import CHECKPOINT_NAME
from tools.workflows.builder import Workflow

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def off_vs_on(info: dict, *, ckpt: str, size: int, steps: int, cfg: float, prefix: str,
              prompt: str, negative: str, **freeu) -> Workflow:
    wf = Workflow(info)
    loader = wf.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = wf.add("CLIPTextEncode", clip=loader[1], text=prompt)
    neg = wf.add("CLIPTextEncode", clip=loader[1], text=negative)
    latent = wf.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    fu = wf.add("PlugKitFreeU", title="FreeU (PlugKit)", model=loader[0], **freeu)
    sampler = dict(seed=42, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    off = wf.add("KSampler", title="KSampler (FreeU off)", model=loader[0], positive=pos[0], negative=neg[0],
                 latent_image=latent[0], **sampler)
    on = wf.add("KSampler", title="KSampler (FreeU on)", model=fu[0], positive=pos[0], negative=neg[0],
                latent_image=latent[0], **sampler)
    off_img = wf.add("VAEDecode", samples=off[0], vae=loader[2])
    on_img = wf.add("VAEDecode", samples=on[0], vae=loader[2])
    wf.add("SaveImage", title="FreeU off", images=off_img[0], filename_prefix=f"{prefix}_off")
    wf.add("SaveImage", title="FreeU on", images=on_img[0], filename_prefix=f"{prefix}_on")
    return wf


def workflows(info: dict) -> dict[str, Workflow]:
    sd15 = off_vs_on(info, ckpt=CHECKPOINT_NAME, size=512, steps=50, cfg=7.5, prefix="freeu_sd15",
                     prompt="a cozy cabin on a snowy mountain, detailed illustration",
                     negative="blurry, low quality",
                     b1=1.5, b2=1.6, s1=0.9, s2=0.2, version="v2", start_percent=0.0, end_percent=1.0,
                     preset="SD1.5", threshold=1, threshold_mode="fixed", apply_to="both")
    sdxl = off_vs_on(info, ckpt=SDXL_CHECKPOINT, size=1024, steps=50, cfg=5.0, prefix="freeu_sdxl",
                     prompt="a cozy cabin on a snowy mountain, detailed illustration",
                     negative="blurry, low quality",
                     b1=1.3, b2=1.4, s1=0.9, s2=0.2, version="v2", start_percent=0.0, end_percent=1.0,
                     preset="auto", threshold=1, threshold_mode="resolution-aware", apply_to="both")
    return {"freeu_sd15.json": sd15, "freeu_sdxl.json": sdxl}
