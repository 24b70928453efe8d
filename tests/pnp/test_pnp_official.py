"""Parity with the official Plug-and-Play code (MichalGeyer/pnp-diffusers), through ComfyUI.

``official_pnp.py`` re-implements the official inversion (preprocess.py) and PnP sampling (pnp.py,
pnp_utils.py) directly on the U-Net; here our nodes run the same model through ComfyUI
(PlugKitPnPInvert -> PlugKitPnPInject -> core KSamplerAdvanced ``ddim`` + ``ddim_uniform``,
add_noise off, CFG 7.5) and must equal it to 1e-5 relative (L2 norm of the difference over the
norm of the official latent).

What is compared. ComfyUI's last DDIM step goes to sigma 0 and returns the x0 prediction; the
official one goes to ``alphas_cumprod[0]``. The sampled result is compared with the official last
step's ``pred_original_sample``; the inversion with every latent the official saves.

Precision. Both sides run the U-Net in float64 (ComfyUI keeps latents in float32). In float32 the
official loop alone moves by 7.6e-5 between float32 and float64 and by 3.3e-5 between 1 and 2 CPU
threads (measured, 10 steps): a 1e-5 test would measure rounding, not the method. In float64 ours
is within 4.0e-6 to 5.9e-6 of it (measured at every setting below; 16x16 latent).

Can it fail? ``test_negative_controls_are_far_outside_the_tolerance`` runs the official loop with
the windows moved by one step (both directions) and with the old first inversion step (clean
latent at sigma 0): 0.098, 0.103 and 0.214 away from ours (must be > 1e-2). Proved once by
breaking our code (2026-12-01): ``injection_steps`` returning ``int(n * share) + 1`` fails
``test_matches_official`` at 10 steps with 0.098 (0.8/0.5) and 0.147 (0.65/0.35); starting the
inversion at sigma 0 fails its inversion check with 4.2e-2.
"""
from __future__ import annotations

import pytest
import torch

import official_pnp as official

TOL = 1e-5
DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def off_env(comfy):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_env()
    torch.set_num_threads(before)


def build_env() -> dict:
    """The float64 tiny model, source latent and prompts (also used to measure the docs' figures)."""
    import comfy.model_management

    from tools.fixtures.models import build_model, random_conditioning

    model = build_model(seed=0, dtype=DT)
    comfy.model_management.load_models_gpu([model])

    def cond(seed):
        c = random_conditioning(seed=seed)
        return [[c[0][0].to(DT), c[0][1]]]

    g = torch.Generator().manual_seed(0)
    env = {
        "model": model,
        "unet": model.model.diffusion_model,
        "raw": torch.randn(1, 4, 16, 16, generator=g).to(DT),
        "empty": cond(11),        # stands in for CLIP's encoding of "" (no CLIP weights here)
        "description": cond(12),  # an inversion prompt describing the source
        "negative": cond(2),
        "prompt": cond(3),
        "cache": {},
    }
    env["latent"] = model.model.process_latent_in(env["raw"])  # the official posterior mean x 0.18215
    return env


def _ours_inverted(env, steps, inversion_prompt, source_prompt):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    key = ("ours", steps, inversion_prompt, source_prompt)
    if key not in env["cache"]:
        kw = {} if source_prompt is None else {"source_prompt": env[source_prompt]}
        env["cache"][key] = PlugKitPnPInvert.execute(
            model=env["model"], samples={"samples": env["raw"]}, conditioning=env[inversion_prompt], steps=steps,
            inversion_steps=steps, scheduler="ddim_uniform", **kw).result
    return env["cache"][key]


def _official_inverted(env, steps, inversion_prompt, first_step_from_zero=False):
    key = ("official", steps, inversion_prompt, first_step_from_zero)
    if key not in env["cache"]:
        with torch.no_grad():
            env["cache"][key] = official.invert(env["unet"], env["latent"], env[inversion_prompt][0][0], steps,
                                                first_step_from_zero=first_step_from_zero)
    return env["cache"][key]


def _ours(env, steps, features, attention, inversion_prompt="empty", source_prompt=None):
    from tools.fixtures.models import sample

    from plugkit.nodes.pnp.nodes import PlugKitPnPInject

    src, inv = _ours_inverted(env, steps, inversion_prompt, source_prompt)
    pm = PlugKitPnPInject.execute(model=env["model"], pnp_source=src, feature_injection=features,
                                  attention_injection=attention).result[0]
    out = sample(pm, inv["samples"].to(DT), env["prompt"], env["negative"], steps=steps, cfg=7.5, sampler="ddim",
                 scheduler="ddim_uniform", add_noise=False)
    return env["model"].model.process_latent_in(out.to(DT)), src


def _official(env, steps, features, attention, inversion_prompt="empty", **kw):
    saved = _official_inverted(env, steps, inversion_prompt, kw.pop("first_step_from_zero", False))
    _, pred_x0 = official.sample(env["unet"], saved, env["empty"][0][0], env["negative"][0][0], env["prompt"][0][0],
                                 steps, features, attention, guidance_scale=7.5, **kw)
    return pred_x0


CASES = [(10, 0.8, 0.5), (10, 0.65, 0.35), (50, 0.8, 0.5), (50, 0.65, 0.35)]


@pytest.mark.parametrize("steps,features,attention", CASES)
def test_matches_official(off_env, steps, features, attention):
    env = off_env
    ours, src = _ours(env, steps, features, attention)
    # the inversion: every stored latent equals the official one saved at that timestep
    saved = _official_inverted(env, steps, "empty")
    sched = official.official_scheduler(steps)
    for i, t in enumerate(sched.timesteps.tolist()):
        vp = src.trajectory.latents[i].double() * sched.alphas_cumprod[t].double().sqrt()
        assert _rel(vp, saved[t]) <= TOL, (t, _rel(vp, saved[t]))
    got = _rel(ours, _official(env, steps, features, attention))
    assert got <= TOL, got


def test_matches_official_with_a_description_as_inversion_prompt(off_env):
    """Official: the source branch always uses the empty prompt, whatever the inversion prompt was."""
    env = off_env
    ours, src = _ours(env, 10, 0.8, 0.5, inversion_prompt="description", source_prompt="empty")
    assert torch.allclose(src.model_kwargs["c_crossattn"].double(), env["empty"][0][0], rtol=1e-6, atol=0)
    assert src.extra["source_prompt"] == "source_prompt"
    got = _rel(ours, _official(env, 10, 0.8, 0.5, inversion_prompt="description"))
    assert got <= TOL, got
    # without source_prompt the source branch keeps the description: no longer the official result
    reused, _ = _ours(env, 10, 0.8, 0.5, inversion_prompt="description")
    assert _rel(reused, _official(env, 10, 0.8, 0.5, inversion_prompt="description")) > 1e-3


def test_negative_controls_are_far_outside_the_tolerance(off_env):
    env = off_env
    ours, _ = _ours(env, 10, 0.8, 0.5)
    for kw in ({"window_shift": 1}, {"window_shift": -1}, {"first_step_from_zero": True}):
        far = _rel(ours, _official(env, 10, 0.8, 0.5, **kw))
        assert far > 1e-2, (kw, far)


@pytest.mark.parametrize("steps", [10, 50])
def test_official_999_inverts_at_every_model_timestep(comfy, steps):
    """inversion_resolution 'official 999' = preprocess.py's 999 steps: one per model timestep 0 -> t_top."""
    import comfy.samplers

    from tools.fixtures.models import build_model

    from plugkit.nodes.pnp.schedule import inversion_schedule, timestep_warp

    ms = build_model(seed=0).get_model_object("model_sampling")
    keep = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", steps).float()
    ascending, fine, positions = inversion_schedule(ms, keep, 999)
    top = int(official.official_scheduler(steps).timesteps[0])
    to_t, _ = timestep_warp(ms)
    assert torch.equal(to_t(fine), torch.arange(0, top + 1, dtype=torch.float32))
    assert torch.allclose(fine, ms.sigmas[: top + 1].float(), rtol=1e-6, atol=0)
    assert torch.equal(fine[positions], ascending) and float(ascending[0]) == pytest.approx(float(ms.sigma_min))
