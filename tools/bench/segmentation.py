"""Feature-segmentation benchmark: full-size SD1.5 U-Net and VAE (random weights), 512 px, one run.

Environment: ``PLUGKIT_SEG_BENCH_SIZE`` (px, default 512 = 64x64 latent), ``PLUGKIT_SEG_BENCH_IMAGES``
(training-set sizes, default ``2,5``) and ``PLUGKIT_SEG_BENCH_ENSEMBLE`` (classifiers, default 10).

(a) training time (features + ensemble) for 2 and 5 images with the default recipe
    (t = 50, 150, 250; blocks 5-9; latent resolution);
(b) segmentation time per image (features + vote + uncertainty at the image size);
(c) feature memory: the feature tensor's size per image, and the peak memory growth of each
    training run and of one segmentation of one image.
The images are the segmentation workflow's drawn still lifes (tools/workflows/segmentation.py).
"""
from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

SIZE = int(os.environ.get("PLUGKIT_SEG_BENCH_SIZE", 512))
IMAGES = tuple(int(v) for v in os.environ.get("PLUGKIT_SEG_BENCH_IMAGES", "2,5").split(","))
ENSEMBLE = int(os.environ.get("PLUGKIT_SEG_BENCH_ENSEMBLE", 10))


def _scenes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from tools.workflows.segmentation import still_life

    images, masks = [], []
    for k in range(n):
        img, mask = still_life(0.3 + 0.4 * ((k * 37) % 10) / 10, 0.4 + 0.2 * ((k * 53) % 10) / 10,
                               0.12 + 0.02 * (k % 4), size=SIZE)
        images.append(torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0))
        masks.append(torch.from_numpy(np.asarray(mask).astype(np.float32) / 255.0))
    return torch.stack(images), torch.stack(masks)


def run(ctx) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if not torch.cuda.is_available() else threads)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx) -> str:
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegment, PlugKitFeatureSegmenterTrain

    model, _clip, vae = ctx.sd15_full()
    images, masks = _scenes(max(IMAGES) + 1)
    rows, segmenter = [], None
    train_peaks = []
    for n in IMAGES:
        got = {}

        def train():
            t0 = time.perf_counter()
            got["out"] = PlugKitFeatureSegmenterTrain.execute(model=model, vae=vae, images=images[:n], masks=masks[:n],
                                                              ensemble_size=ENSEMBLE).result
            got["seconds"] = time.perf_counter() - t0

        train_peaks.append((n, ctx.peak_memory(train)))
        segmenter, report = got["out"]
        rows.append((f"train, {n} images", got["seconds"]))
        log.info("segmentation bench: %s", report)
    held = images[-1:]

    def segment():
        return PlugKitFeatureSegment.execute(segmenter=segmenter, model=model, vae=vae, images=held).result

    times = ctx.alternate({"segment, 1 image": segment}, repeats=min(ctx.repeats, 3))
    rows.append(("segment, 1 image", ctx.median(times["segment, 1 image"])))
    peak = ctx.peak_memory(segment)
    lat = SIZE // 8
    feat_mib = segmenter.dim * lat * lat * 4 / 2**20
    lines = [f"## Feature segmentation (SD1.5 random weights, {SIZE} px, {ENSEMBLE} classifiers, "
             f"steps {list(segmenter.steps)}, blocks {list(segmenter.blocks)})",
             "", "| case | seconds |", "|---|---:|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in rows]
    lines += ["", f"Features: {segmenter.dim} per latent cell, {feat_mib:.0f} MiB per image ({lat}x{lat} latent); "
              f"peak memory growth of one segmentation: {peak / 2**20:.0f} MiB; of training: "
              + ", ".join(f"{n} images {p / 2**20:.0f} MiB" for n, p in train_peaks)
              + " (the VAE encodes the whole batch at once where ComfyUI finds the memory free, as VAEEncode does).",
              "", "Last training report:",
              "```", report, "```"]
    return "\n".join(lines)
