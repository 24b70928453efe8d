"""Diff-Plugin training at scale (issue 14) on the tiny in-process SD1.x model: streamed pairs, the official
recipe's options (lr scaling, accumulation, augmentation, timesteps and loss), precision, torchrun/DDP."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent


def write_pairs(root: Path, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    (root / "input").mkdir(parents=True)
    (root / "target").mkdir()
    for i in range(n):
        clean = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        degraded = np.clip(clean.astype(int) + rng.integers(0, 80, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(degraded).save(root / "input" / f"p{i:04d}.png")
        Image.fromarray(clean).save(root / "target" / f"p{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def frozen(comfy, tiny_clip_vision, tiny_vae):
    from tools.models import build_model

    from plugkit.nodes.diff_plugin.train_nodes import alphas_cumprod, make_eps_model

    model = build_model(seed=0)
    return model, tiny_clip_vision, tiny_vae, make_eps_model(model), alphas_cumprod(model)


def fresh_plugin():
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plugin = TaskPlugin("tiny", scb_channels=32)
        for conv in plugin.scb.controlnet_down_blocks:  # non-zero residuals, so the U-Net path carries gradient
            torch.nn.init.normal_(conv.weight, std=0.02)
    return plugin


def train(frozen, source, output, **config):
    from plugkit.nodes.diff_plugin import plugin_training as pt

    _, _, _, eps_model, alphas = frozen
    args = dict(steps=2, batch_size=1, learning_rate=1e-3, lr_scaling="none", save_every=0, seed=0)
    args.update(config)
    return pt.train_plugin(fresh_plugin(), eps_model, source, alphas, pt.TrainConfig(**args), output, resume=False)


class GradTap:
    """The gradients each optimiser step applies (after unscaling and clipping), via torch's global
    optimizer step pre-hook."""

    def __enter__(self):
        self.grads = []
        self.handle = torch.optim.optimizer.register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self.grads.append(torch.cat(
                [p.grad.detach().flatten().clone() for g in opt.param_groups for p in g["params"]])))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- streaming -----------------------------------------------------------------------------------------

def test_pairs_stream_memory_does_not_grow_with_the_dataset(frozen, tmp_path):
    """10 vs 200 pairs: the pairs held alive at once (encoded latents + CLIP states) and the images read
    per step are the same, at most one batch; the in-memory path would hold all of them (10 and 200).
    Streaming trains exactly as the old pre-encoded path does on the same pairs and seed."""
    from plugkit.nodes.diff_plugin import plugin_training as pt
    from plugkit.nodes.diff_plugin.train_nodes import encode_pairs, make_encoder

    model, cv, vae, _, _ = frozen
    figures = {}
    for n in (10, 200):
        data = write_pairs(tmp_path / f"d{n}", n)
        pairs, _ = pt.find_pairs(data)
        alive, peak, reads = [], [0], [0]
        encode = make_encoder(model, cv, vae, device="cpu")

        def counting(name, degraded, clean):
            gc.collect()
            peak[0] = max(peak[0], sum(r() is not None for r in alive) + 1)
            reads[0] += 1
            pair = encode(name, degraded, clean)
            alive.append(weakref.ref(pair.clean_latent))
            return pair

        stream = pt.PairStream(pairs, 64, counting)
        result = train(frozen, stream, tmp_path / f"s{n}.safetensors", steps=3, batch_size=2, grad_accum=2)
        figures[n] = (peak[0], reads[0])
        if n == 10:
            streamed = result
            crops, _ = pt.read_pairs(pairs, 64)
            held = train(frozen, encode_pairs(model, cv, vae, crops), tmp_path / "held.safetensors", steps=3,
                         batch_size=2, grad_accum=2)
    assert figures[10] == figures[200], figures
    assert figures[10][0] <= 2 and figures[10][1] == 3 * 2 * 2, figures  # <= one micro-batch alive; 12 pairs read
    assert streamed.losses == held.losses
    for k, v in held.plugin.state_dict().items():
        assert torch.equal(streamed.plugin.state_dict()[k], v), k
