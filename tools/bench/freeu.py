"""FreeU: seconds per sampling step of the full-size SD1.5 U-Net, unpatched vs core FreeU_V2 vs PlugKitFreeU.

One sampling step = one Euler step with CFG (cond and uncond batched: one U-Net forward at batch 2)
on a 64x64 latent. Cases are timed alternately (tools.bench). A second table times the FreeU work
alone: the output-block patch over the 12 decoder concats of one SD1.5 forward, fed SD1.5-shaped
features, which isolates the patch's own cost from U-Net noise.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("plugkit.bench.freeu")

LATENT = (1, 4, 64, 64)
B1, B2, S1, S2 = 1.3, 1.4, 0.9, 0.2


def _sd15_decoder_features(batch: int = 2, size: int = 64):
    """(h, hsp) pairs with the shapes SD1.5's decoder concatenates at a size x size latent."""
    gen = torch.Generator().manual_seed(0)
    s8, s4, s2, s1 = size // 8, size // 4, size // 2, size
    shapes = ([(1280, s8, 1280, s8)] * 3 + [(1280, s4, 1280, s4)] * 2 +
              [(1280, s4, 640, s4), (1280, s2, 640, s2), (640, s2, 640, s2), (640, s2, 320, s2),
               (640, s1, 320, s1), (320, s1, 320, s1), (320, s1, 320, s1)])
    return [(torch.randn(batch, ch, hs, hs, generator=gen), torch.randn(batch, cs, ss, ss, generator=gen))
            for ch, hs, cs, ss in shapes]


def run(ctx) -> str:
    import comfy.samplers  # noqa: F401  (host is on sys.path once ctx exists)
    import nodes as comfy_nodes

    from plugkit.nodes.freeu.nodes import PlugKitFreeU
    from tools.fixtures.models import random_conditioning, sample

    if "FreeU_V2" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        import asyncio

        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    model, _, _ = ctx.sd15_full()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pos, neg = random_conditioning(seed=1), random_conditioning(seed=2)
    latent = torch.zeros(LATENT)

    # The patch alone over one forward's 12 concats (batch 2, as with CFG).
    from plugkit.nodes.freeu.hooks import FreeUPatch

    core = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, B1, B2, S1, S2)[0]
    core_patch = core.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    our_patch = FreeUPatch(320, B1, B2, S1, S2)
    feats = [(h.to(device), hsp.to(device)) for h, hsp in _sd15_decoder_features(2, LATENT[-1])]
    opts = {"sigmas": torch.tensor([1.0], device=device), "cond_or_uncond": [1, 0],
            "original_shape": [2, *LATENT[1:]]}

    def forward_of(patch):
        def fn():
            for h, hsp in feats:
                patch(h.clone(), hsp, opts)  # both patches scale h in place
        return fn

    def clones_only():
        for h, _ in feats:
            h.clone()

    micro = ctx.alternate({"clone only": clones_only, "core FreeU_V2 patch": forward_of(core_patch),
                           "PlugKitFreeU patch": forward_of(our_patch)}, repeats=ctx.repeats * 6)
    micro_med = {name: ctx.median(ts) for name, ts in micro.items()}
    base_clone = micro_med["clone only"]
    micro_rows = [(name, max(v - base_clone, 0.0) * 1000) for name, v in micro_med.items() if name != "clone only"]

    log.info("freeu bench: patch only (ms per forward): %s", micro_rows)

    ours = PlugKitFreeU.execute(model=model, b1=B1, b2=B2, s1=S1, s2=S2).result[0]
    # A one-step run samples at sigma_max (0% progress): start_percent 0.5 excludes that step.
    excluded = PlugKitFreeU.execute(model=model, b1=B1, b2=B2, s1=S1, s2=S2, start_percent=0.5).result[0]
    cases_models = {"unpatched": model, "core FreeU_V2": core, "PlugKitFreeU": ours,
                    "PlugKitFreeU, step outside range": excluded}

    def step(name, m):
        def fn():
            t0 = time.perf_counter()
            sample(m, latent, pos, neg, steps=1, cfg=5.0, seed=0)
            log.info("freeu bench: %s step %.2fs", name, time.perf_counter() - t0)
        return fn

    cases = {name: step(name, m) for name, m in cases_models.items()}
    times = ctx.alternate(cases)
    medians = [(name, ctx.median(ts)) for name, ts in times.items()]
    peaks = {name: ctx.peak_memory(fn) for name, fn in cases.items()}

    lines = [
        "## FreeU",
        f"Full-size SD1.5 U-Net (random weights, {model.model_dtype()}), latent {LATENT[2]}x{LATENT[3]}, "
        f"one Euler step with CFG (batch 2), device {device}; medians of {ctx.repeats} alternating runs.",
        "",
        ctx.ratio_table(medians, "unpatched"),
        "",
        "Peak memory growth during one step (" + ("CUDA allocations" if device == "cuda" else "process RSS") + "):",
        "",
        "| case | peak (MiB) |",
        "|---|---:|",
        *[f"| {name} | {peaks[name] / 2**20:.1f} |" for name in cases],
        "",
        "FreeU work alone: the output-block patch over the 12 decoder concats of one forward "
        "(SD1.5 shapes, batch 2), minus the cost of cloning h:",
        "",
        "| patch | ms per forward |",
        "|---|---:|",
        *[f"| {name} | {ms:.2f} |" for name, ms in micro_rows],
    ]
    return "\n".join(lines)
