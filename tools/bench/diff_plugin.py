"""Diff-Plugin: sampling with a Task-Plugin vs plain cfg-1 sampling with the same steps, the
full-size SD1.5 U-Net, a 64x64 latent; plugin load time; parameter counts of TPB and SCB.

The plugin case is what the official pipeline costs per step on top of the U-Net: one SCB forward
(its three residuals added to the first skips) per U-Net forward. Both cases sample with cfg 1 (one
U-Net pass per step) from the same start latent with Fp as the context; only the SCB differs.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

LATENT = (1, 4, 64, 64)
STEPS = 2


def _released_plugin_folder(root: Path) -> Path:
    """A plugin folder in the released layout (random weights) for timing the loader."""
    import json

    from plugkit.nodes.diff_plugin.task_plugin import SpatialComplementBranch, TaskPromptBranch
    from tools.fixtures.diff_plugin_models import RELEASED_SCB_CONFIG

    folder = root / "derain"
    (folder / "scb").mkdir(parents=True)
    (folder / "scb" / "config.json").write_text(json.dumps(RELEASED_SCB_CONFIG))
    torch.save(SpatialComplementBranch().state_dict(), folder / "scb" / "diffusion_pytorch_model.bin")
    torch.save({"model": TaskPromptBranch().state_dict()}, folder / "tpb.pt")
    return folder


class _ClipVisionFeatures:
    """CLIP ViT-L/14-shaped features (the CLIP encoder's cost is outside the sampling comparison)."""

    def encode_image(self, image, crop=True):
        gen = torch.Generator().manual_seed(0)
        return {"last_hidden_state": torch.randn(image.shape[0], 257, 1024, generator=gen)}


def training_section(pair_counts=(10, 1000), steps: int = 6, batch: int = 2) -> str:
    """Streaming training on the tiny test models, each dataset size in a fresh process: pairs/s (after
    the first step) and memory (peak RSS growth while training, and the process's peak RSS)."""
    import json
    import subprocess
    import sys

    rows = []
    for n in pair_counts:
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("_diff_plugin_train_case.py")), str(n),
                              str(steps), str(batch)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 1024 * 1024
    lines = [
        "### Diff-Plugin training: streamed pairs",
        f"Tiny SD1.x U-Net / VAE / CLIP vision of the tests, 64 px pairs, batch {batch}, {steps} steps, CPU, "
        f"{rows[0]['threads']} threads, one fresh process per dataset size.",
        "",
        "| pairs | pairs/s | RSS growth while training (MiB) | peak RSS of the process (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['pairs']:,} | {r['pairs_per_s']:.2f} | {r['rss_growth'] / mib:.1f} | {r['max_rss'] / mib:.1f} |")
    return "\n".join(lines)


def run(ctx) -> str:
    from plugkit.nodes.diff_plugin import plugin_files
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin
    from plugkit.nodes.diff_plugin.hooks import PluginHandle
    from plugkit.nodes.diff_plugin.task_plugin import parameter_count
    from tools.fixtures.models import sample

    model, _, vae = ctx.sd15_full()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        folder = _released_plugin_folder(Path(tmp))
        load_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            plugin = plugin_files.load_plugin(folder)
            load_times.append(time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking SCB: non-zero output convs
        for conv in plugin.scb.controlnet_down_blocks:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.01)
    handle = PluginHandle(plugin)
    image = torch.rand(1, LATENT[2] * 8, LATENT[3] * 8, 3, generator=gen)
    m, positive, latent = apply_task_plugin(model, handle, _ClipVisionFeatures(), vae, image)
    plain = [[positive[0][0], {}]]
    start = latent["samples"]

    cases = {
        "plain cfg-1 sampling (Fp as context)": lambda: sample(model, start, plain, [], steps=STEPS, cfg=1.0,
                                                               sampler="uni_pc_bh2", seed=0),
        "with Task-Plugin (SCB each step)": lambda: sample(m, start, positive, [], steps=STEPS, cfg=1.0,
                                                           sampler="uni_pc_bh2", seed=0),
    }
    times = ctx.alternate(cases, repeats=min(ctx.repeats, 2))
    medians = [(name, ctx.median(ts)) for name, ts in times.items()]
    n_tpb, n_scb = parameter_count(plugin.tpb), parameter_count(plugin.scb)
    lines = [
        "## Diff-Plugin",
        f"Full-size SD1.5 U-Net (random weights, {model.model_dtype()}), latent {LATENT[2]}x{LATENT[3]}, "
        f"{STEPS} UniPC steps at cfg 1 (one U-Net pass per step), device {device}; "
        f"medians of {min(ctx.repeats, 2)} alternating runs (target: plugin <= 1.15x plain).",
        "",
        ctx.ratio_table(medians, "plain cfg-1 sampling (Fp as context)"),
        "",
        f"Plugin load (released layout: scb/config.json + diffusion_pytorch_model.bin + tpb.pt, strict, "
        f"weights_only): median {ctx.median(load_times):.3f} s of {len(load_times)}.",
        "",
        "| part | parameters |",
        "|---|---:|",
        f"| TPB | {n_tpb:,} |",
        f"| SCB | {n_scb:,} |",
        f"| Task-Plugin | {n_tpb + n_scb:,} |",
        "",
        training_section(),
    ]
    return "\n".join(lines)
