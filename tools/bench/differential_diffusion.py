"""Differential Diffusion: seconds per sampling step with the denoise-mask patch vs without.

Full-size (random-weight) SD1.5 U-Net, 256x256 px (32x32 latent), euler, ``normal``, CFG 1 (one
model call per step). "without" samples the same latent with the same noise mask (SetLatentNoiseMask
semantics) on the unpatched model, so the ratio isolates what the patch adds; the no-mask row shows
what inpainting's blending itself costs. A second table times the mask function alone, per call,
which is far more precise than the end-to-end difference on a noisy machine.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

STEPS = 3
LATENT = 32


def run(ctx) -> str:
    import torch

    from plugkit.nodes.differential_diffusion.change_map import linear_gradient
    from plugkit.nodes.differential_diffusion.hooks import DenoiseMaskSchedule
    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion
    from tools.fixtures.models import random_conditioning, sample

    model, _, _ = ctx.sd15_full()
    latent = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)) * 4.0
    pos, neg = random_conditioning(seed=1), random_conditioning(seed=2)
    change = linear_gradient(LATENT * 8, LATENT * 8)
    m_sigma, out = PlugKitDifferentialDiffusion.execute(model=model, samples={"samples": latent},
                                                        change_map=change).result
    m_step, _ = PlugKitDifferentialDiffusion.execute(model=model, samples={"samples": latent},
                                                     change_map=change, schedule="step").result
    mask = out["noise_mask"]

    def run_with(m, noise_mask):
        return lambda: sample(m, latent, pos, neg, steps=STEPS, cfg=1.0, noise_mask=noise_mask)

    cases = {
        "unpatched, noise mask": run_with(model, mask),
        "PlugKit schedule=sigma": run_with(m_sigma, mask),
        "PlugKit schedule=step": run_with(m_step, mask),
        "unpatched, no mask": run_with(model, None),
    }
    times = ctx.alternate(cases, ctx.repeats)
    rows = [(name, ctx.median(ts) / STEPS) for name, ts in times.items()]
    table = ctx.ratio_table(rows, baseline="unpatched, noise mask", unit="s/step")

    # the mask function alone, per call, at this latent size
    sampling = model.model.model_sampling
    sigmas = torch.linspace(float(sampling.sigma_max), 0.0, 21)
    opts = {"model": SimpleNamespace(inner_model=model.model), "sigmas": sigmas}
    dmask = mask.expand(1, 4, LATENT, LATENT).contiguous()
    per_call = []
    for schedule in ("sigma", "step"):
        fn = DenoiseMaskSchedule(schedule)
        calls = 2000
        t0 = time.perf_counter()
        for i in range(calls):
            fn(sigmas[i % 20].view(1), dmask, opts)
        per_call.append((schedule, (time.perf_counter() - t0) / calls))
    step_s = dict(rows)["unpatched, noise mask"]
    micro = ["| mask function | per call (us) | share of one step |", "|---|---:|---:|"]
    for schedule, s in per_call:
        micro.append(f"| schedule={schedule} | {s * 1e6:.1f} | {s / step_s * 100:.4f}% |")
    ratio = dict(rows)["PlugKit schedule=sigma"] / step_s
    return "\n".join([
        "## Differential Diffusion",
        f"SD1.5 U-Net (random weights), {LATENT * 8}x{LATENT * 8} px, {STEPS} euler steps, CFG 1, "
        f"{ctx.repeats} alternating repeats; seconds per step (medians). Target: <= 1.01x.",
        "",
        table,
        "",
        "Mask function alone (one call per model evaluation):",
        "",
        "\n".join(micro),
        "",
        f"Patched / unpatched: {ratio:.3f}x end to end; the function itself costs "
        f"{per_call[0][1] / step_s * 100:.4f}% of a step.",
    ])
