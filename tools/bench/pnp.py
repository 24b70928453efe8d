"""Plug-and-Play benchmark: full-size SD1.5 U-Net (random weights), 64x64 latent, CPU, one run.

Environment: ``PLUGKIT_PNP_BENCH_SIZE`` (px, default 512 = 64x64 latent; each 5-step CFG run takes
minutes on a busy 2-core CPU), ``PLUGKIT_PNP_BENCH_RECON=1`` adds (g), the reconstruction-vs-inversion
table (plain, official 999 and fixed-point inversions at ``PLUGKIT_PNP_BENCH_RECON_STEPS`` sampling
steps, default 50; the 999-step row takes 999 U-Net calls: use a small size on a CPU) and the chord error.

Issue 15's items, ddim + ddim_uniform, 5 steps, CFG 7.5, default windows 0.8 / 0.5:
(a) second and later runs with ``source_mode`` cache / plain CFG sampling (target <= 1.05x);
(b) in-batch / plain (target <= 1.45x; batch sizes alone: 1.40x);
(c) batch 4 on one source: rows per windowed U-Net call (9, not 12), counted at a 16x16 latent;
(d) peak tensor memory of one injected step (in-batch, cache hit, plain), live tensor storage
    measured op by op, plus the model's weights (what a GPU holds); the cache's size;
(e) inversion per step / plain CFG sampling per step (target <= 0.55x);
(f) the feature map's self-attention view: peak live tensor memory at 512 and 1024 px (SD1.5
    block 9 shapes: 8 heads, 320 channels, (px/8)^2 tokens) vs the old float64 heads x N x N.
Timed runs alternate (plain, in-batch, cache first run, cache, inversion, then again), one
model-loading warm-up step first.
"""
from __future__ import annotations

import gc
import logging
import os
import time

import torch

from tools.bench.live_tensors import LiveTensorBytes
from tools.harness.host import REPO

log = logging.getLogger(__name__)

STEPS = 5  # ddim_uniform: 5 steps; feature window int(5*0.8) = 4 steps, attention int(5*0.5) = 2
SIZE = int(os.environ.get("PLUGKIT_PNP_BENCH_SIZE", 512))  # px; 512 -> the 64x64 latent
RECON = os.environ.get("PLUGKIT_PNP_BENCH_RECON", "") not in ("", "0")
RECON_STEPS = int(os.environ.get("PLUGKIT_PNP_BENCH_RECON_STEPS", 50))


def _source_latent(vae, size=SIZE) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    path = REPO / "workflows" / "input" / "pnp_source.png"
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
    return vae.encode(pixels[:, :, :, :3])


def run(ctx) -> str:
    # One thread: on a shared 2-core machine two threads oversubscribe the cores (10x slower here);
    # every case runs under the same setting, so the ratios are unaffected.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(ctx) -> str:
    import dataclasses

    import comfy.ldm.modules.attention as attention_mod

    from tools.fixtures.models import sample

    from plugkit.nodes.pnp.feature_pca import attention_principal_components
    from plugkit.nodes.pnp.nodes import PlugKitPnPInject, PlugKitPnPInvert

    model, clip, vae = ctx.sd15_full()

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    empty = encode("")
    target = encode("a photo of a golden orange on a wooden table")
    negative = encode("ugly, blurry, black, low res, unrealistic")
    latent = _source_latent(vae)
    log.info("pnp bench: latent %s", tuple(latent.shape))

    def invert(lat=latent, inversion_steps=STEPS):
        return PlugKitPnPInvert.execute(model=model, samples={"samples": lat}, conditioning=empty, steps=STEPS,
                                        inversion_steps=inversion_steps, source_prompt=empty).result

    source, inverted = invert()

    def inject(src, mode="in-batch", m=model):
        return PlugKitPnPInject.execute(model=m, pnp_source=src, source_mode=mode).result[0]

    in_batch = inject(source)
    cache_src = dataclasses.replace(source)  # its own cache
    cached = inject(cache_src, "cache")

    def sampled(m, lat=None, **kw):
        return sample(m, inverted["samples"] if lat is None else lat, target, negative, steps=STEPS, cfg=7.5,
                      sampler="ddim", scheduler="ddim_uniform", add_noise=False, **kw)

    one_step = dict(start_step=0, last_step=1, force_full_denoise=False)
    log.info("pnp bench: warm-up (one step, loads the model)")
    sampled(model, **one_step)
    times = {k: [] for k in ("plain CFG sampling", "PnP in-batch", "PnP cache, first run", "PnP cache, later run",
                             "inversion")}
    order = [("plain CFG sampling", lambda: sampled(model)), ("PnP in-batch", lambda: sampled(in_batch)),
             ("PnP cache, first run", lambda: sampled(cached)), ("PnP cache, later run", lambda: sampled(cached)),
             ("inversion", lambda: invert()),
             ("plain CFG sampling", lambda: sampled(model)), ("PnP in-batch", lambda: sampled(in_batch)),
             ("PnP cache, later run", lambda: sampled(cached))]
    for name, fn in order:
        if name == "PnP cache, first run":
            cache_src.cache.reset(None)
        times[name].append(_timed(fn))
        log.info("pnp bench: %s %.1f s", name, times[name][-1])
    med = {k: ctx.median(v) for k, v in times.items() if v}
    n_steps = source.trajectory.sigmas.numel() - 1
    ratio_a = med["PnP cache, later run"] / med["plain CFG sampling"]
    ratio_b = med["PnP in-batch"] / med["plain CFG sampling"]
    ratio_e = (med["inversion"] / source.inversion_steps) / (med["plain CFG sampling"] / n_steps)
    cache_bytes = cache_src.cache.nbytes()
    cache_sigmas = len(cache_src.cache.steps)

    # (d) peak live tensor memory of the first (injected) step, plus the weights
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    mem = {}
    for name, m in (("plain CFG sampling", model), ("PnP cache, later run", cached), ("PnP in-batch", in_batch)):
        gc.collect()
        with LiveTensorBytes() as tracker:
            sampled(m, **one_step)
        mem[name] = tracker.peak
        log.info("pnp bench: peak tensors, one step, %s: %.0f MiB", name, tracker.peak / 2**20)

    # (c) rows per U-Net call, batch 4 on one source (16x16 latent: counts do not depend on size)
    rows = []

    def count(q, k, v, extra):
        if extra.get("block_index", 0) == 0:
            rows.append(q.shape[0])
        return attention_mod.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                                 transformer_options=extra)

    small = torch.nn.functional.interpolate(latent, size=(16, 16), mode="area")
    small_src, small_inv = invert(small)
    counting = model.clone()
    counting.set_model_attn1_replace(count, "output", 4, 0)
    sample(inject(small_src, m=counting), small_inv["samples"].repeat(4, 1, 1, 1), target, negative, steps=STEPS,
           cfg=7.5, sampler="ddim", scheduler="ddim_uniform", add_noise=False)
    rows_c = list(rows)

    # (f) the feature map's self-attention view (SD1.5 block 9 shapes, random q/k)
    view = []
    for px, passes in ((512, 400), (1024, 1)):
        n = (px // 8) ** 2
        g = torch.Generator().manual_seed(0)
        q = torch.randn(n, 320, generator=g)
        k = torch.randn(n, 320, generator=g)
        gc.collect()
        t0 = time.perf_counter()
        with LiveTensorBytes() as tracker:
            attention_principal_components(q, k, 8, 3, max_passes=passes)
        view.append((px, n, tracker.peak, 8 * n * n * 8, time.perf_counter() - t0, passes))
        log.info("pnp bench: attention view %d px: %.0f MiB", px, tracker.peak / 2**20)

    rows_table = ctx.ratio_table([(k, med[k]) for k in times if k in med], "plain CFG sampling")
    mib = 2**20
    lines = [
        "## Plug-and-Play",
        f"Full-size SD1.5 U-Net (random weights with a pass-through path), {SIZE}x{SIZE} px "
        f"({SIZE // 8}x{SIZE // 8} latent), CPU fp32 (1 thread), ddim + ddim_uniform, {n_steps} steps, CFG 7.5, "
        f"windows 0.8 / 0.5 (source branch in {int(n_steps * 0.8)} of {n_steps} steps), inversion with "
        f"{source.inversion_steps} steps. Timed runs alternate; medians of {len(times['plain CFG sampling'])} "
        f"(cache first run and inversion: 1).",
        "",
        rows_table,
        "",
        f"- (a) cache, later runs / plain CFG sampling: **{ratio_a:.3f}x** (target <= 1.05x); the cache's "
        f"first run: {med['PnP cache, first run'] / med['plain CFG sampling']:.3f}x",
        f"- (b) in-batch / plain: **{ratio_b:.3f}x** (target <= 1.45x)",
        f"- (c) batch 4 on one source, rows per U-Net call: {rows_c} (9 inside the windows, 8 after)",
        f"- (d) peak live tensors during one injected step: plain {mem['plain CFG sampling'] / mib:.0f} MiB, "
        f"cache {mem['PnP cache, later run'] / mib:.0f} MiB, in-batch {mem['PnP in-batch'] / mib:.0f} MiB; with the "
        f"U-Net's {weights / mib:.0f} MiB of weights: in-batch "
        f"**{((weights + mem['PnP in-batch']) / (weights + mem['plain CFG sampling']) - 1) * 100:+.1f}%**, cache "
        f"{((weights + mem['PnP cache, later run']) / (weights + mem['plain CFG sampling']) - 1) * 100:+.1f}% "
        f"(target <= +10%). Cache: {cache_sigmas} sigmas, {cache_bytes / mib:.0f} MiB in fp32 "
        f"({cache_bytes / 2 / mib:.0f} MiB where the model runs fp16; at 50 steps x10).",
        f"- (e) inversion per step / plain CFG sampling per step: **{ratio_e:.3f}x** (target <= 0.55x)",
        "- (f) feature map, self-attention view (block 9 shapes, 8 heads, 320 channels), peak live tensors:",
        "",
        "| image | tokens N | bounded view | old float64 heads x N x N | time (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {px} px | {n} | {peak / mib:.0f} MiB | {old / mib:.0f} MiB | {t:.1f}"
              f"{'' if passes > 1 else ' (1 Lanczos pass: memory only)'} |" for px, n, peak, old, t, passes in view]
    if RECON:
        lines += ["", *_reconstruction(ctx, model, latent, empty, invert, source)]
    return "\n".join(lines)


def _reconstruction(ctx, model, latent, empty, invert, source) -> list:
    """The reconstruction-vs-inversion table and the chord error (PLUGKIT_PNP_BENCH_RECON=1)."""
    import comfy.model_management
    import comfy.samplers

    from plugkit.nodes.pnp.ddim_inversion import SourceTrajectory, ddim_invert, subdivide_schedule
    from plugkit.nodes.pnp.schedule import input_scale, timestep_warp

    from tools.fixtures.pnp_reconstruction import official_reconstruction_error

    # (g) official reconstruction (ends at sigma_min, as preprocess.py) after each way of inverting
    recon = []
    cases = [(f"{RECON_STEPS} steps", dict(inversion_steps=RECON_STEPS)),
             (f"{2 * RECON_STEPS} steps", dict(inversion_steps=2 * RECON_STEPS)),
             ("official 999", dict(inversion_resolution="official 999")),
             (f"{RECON_STEPS} steps + 1 fixed-point iteration", dict(inversion_steps=RECON_STEPS, fixed_point_iterations=1)),
             (f"{RECON_STEPS} steps + 2 fixed-point iterations", dict(inversion_steps=RECON_STEPS, fixed_point_iterations=2))]
    for name, kw in cases:
        t0 = time.perf_counter()
        err, src = official_reconstruction_error(model, latent, empty, RECON_STEPS, **kw)
        evaluations = src.inversion_steps * (1 + src.extra.get("fixed_point_iterations", 0))
        recon.append((name, evaluations, err, time.perf_counter() - t0))
        log.info("pnp bench: reconstruction %s: %d evaluations, error %.4f", name, evaluations, err)
    comfy.model_management.load_models_gpu([model])
    ms = model.get_model_object("model_sampling")
    coarse = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", STEPS).float()
    fine, pos = subdivide_schedule(coarse.flip(0), 4, *timestep_warp(ms))
    ctx_tokens = source.model_kwargs["c_crossattn"]
    x0 = model.model.process_latent_in(latent)

    def eps_fn(x, lo, hi):
        k = input_scale(ms, lo, hi)
        x_in = x * k
        with torch.no_grad():
            den = model.model.apply_model(x_in, torch.tensor([hi]), c_crossattn=ctx_tokens)
        return (x_in - den) / hi

    all_lat = ddim_invert(x0, fine, eps_fn, keep="all")
    traj = SourceTrajectory(coarse, torch.stack([all_lat[p] for p in reversed(pos)]))
    chord = []
    for i, s in enumerate(fine.tolist()):
        if i not in pos:
            actual = all_lat[i]
            chord.append(float((traj.at(s) - actual).pow(2).mean().sqrt() / actual.pow(2).mean().sqrt()))
    lines = [f"(g) Inversion vs reconstruction at {RECON_STEPS} sampling steps: invert, then DDIM back with the "
             "inversion prompt and no CFG, the last step to sigma_min as the official preprocess.py; relative RMS error "
             "against the source latent:", "",
             "| inversion | model evaluations | relative RMS error | seconds (invert + reconstruct) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {ev} | {err:.4f} | {sec:.0f} |" for name, ev, err, sec in recon]
    lines += ["", f"Chord interpolation (4 substeps, {len(chord)} intermediate sigmas): relative RMS error median "
              f"{ctx.median(chord):.2e}, max {max(chord):.2e}."]
    return lines
