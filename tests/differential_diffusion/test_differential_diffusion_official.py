"""Parity with the official Differential Diffusion loop (exx8/differential-diffusion ``SD2/diff_pipe.py``).

``official_loop`` below is the official ``__call__`` denoising loop, re-written for this test from
``SD2/diff_pipe.py`` (not copied): ``original_with_noise = scheduler.add_noise(latent, noise,
timesteps)`` (one noise, every timestep), ``thresholds = arange(N) / N``, ``masks = map > thresholds``
(white = keep), step 0 from ``original_with_noise[0]``, at step i > 0 ``latents =
original_with_noise[i] * mask_i + latents * (1 - mask_i)``, then classifier-free guidance on the
noise prediction and ``scheduler.step``. The map is fitted to the latent with
``torchvision.transforms.Resize(..., antialias=None)``, as the official code does. The scheduler is
diffusers' DDIMScheduler (eta 0) with the SD2.1-base scheduler config (scaled_linear 0.00085-0.012,
``set_alpha_to_one`` False, ``steps_offset`` 1, leading spacing): the one-step scheduler whose
ComfyUI counterpart is exact (euler on ``ddim_uniform`` sigmas). The U-Net is the tiny ComfyUI model
itself, called as the official code calls its U-Net (latents scaled to unit variance, integer
timestep, the prompt embedding).

ComfyUI runs ``PlugKitDifferentialDiffusion`` (``schedule`` step, ``map_convention`` white=keep,
``map_resize`` bilinear) with euler on the same timesteps. ``set_alpha_to_one`` False makes DDIM's
last step go to alphas_cumprod[0] (sigma 0.0292), not to 0; the ComfyUI run gets those sigmas
through ``sample_custom`` (the ``ddim_uniform`` sigmas with the final 0 replaced by sigma_min).
A second case runs plain KSampler (``ddim_uniform``, final sigma 0) against ``set_alpha_to_one``
True.

Strength < 1: the SD2 loop's thresholds span the steps run (our default), the SDXL loop's
(``SDXL/diff_pipe.py``) all N steps (our ``total_steps`` = N); both are compared.

Precision. Both sides run the U-Net in float64 on one CPU thread; ComfyUI keeps its latents in
float32. Measured (L2 relative, 2026-12-01): 5.2e-7 (8 steps), 5.8e-7 (10), 4.0e-7 (50), 6.3e-7
(KSampler, final sigma 0), 3.8e-7 (strength 0.6, SD2), 3.3e-7 (strength 0.6, SDXL thresholds).
With the U-Net in float32 the same comparison measured 1.5e-5 at 8 steps (max-abs relative):
rounding amplified by CFG 7, not the rule.

Can it fail? ``test_a_rule_moved_by_one_step_fails`` runs the official loop with its thresholds
moved by one step either way (``shift`` +-1: every pixel released a step later / earlier): 0.31 and
0.46 from our node at 10 steps (0.098 and 0.145 at 50). Proved once by breaking our code
(2026-12-01): ``step_free_mask`` with this pack's old rule (held while keep > i/N instead of
(i+1)/N) fails ``test_step_schedule_equals_the_official_loop[8]`` at 0.351.
"""
from __future__ import annotations

import pytest
import torch

TOL = 1e-5  # relative: L2 norm of (ours - official) over the norm of official (as the PnP parity test)
DT = torch.float64  # both sides run the U-Net in float64 (ComfyUI keeps its latents in float32)
CFG = 7.0  # SD2/run.py's guidance_scale
LATENT = 16  # a 16x16 latent (128x128 px), 4 channels


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def official_scheduler(set_alpha_to_one: bool = False, float64_schedule: bool = True):
    """DDIM with SD2.1-base's scheduler config. ``float64_schedule``: the same scaled_linear
    alphas_cumprod computed in float64, as ComfyUI computes the model's schedule; diffusers' own
    float32 cumprod differs from it by up to 1e-6 in alpha (1.3e-5 in sigma near t = 0)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                              steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    if float64_schedule:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        scheduler.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=DT) if set_alpha_to_one else scheduler.alphas_cumprod[0]
    return scheduler


@torch.no_grad()
def official_loop(unet, image_latent, noise, keep_map, steps, cond, uncond, *, guidance=CFG,
                  set_alpha_to_one=False, shift=0, float64_schedule=True, strength=1.0, sdxl=False):
    """The official SD2 loop (eta 0, batch 1). ``keep_map`` [1, H, W] at image size, white = keep.
    ``strength`` as ``get_timesteps`` (the last int(N * strength) of the N timesteps are run).
    ``sdxl``: ``SDXL/diff_pipe.py``'s thresholds instead, ``arange(N) / N`` over all N steps and
    indexed from the first step run (SD2: over the steps run); the rest of the loop is the same.
    ``shift`` moves the thresholds by that many steps (negative control only)."""
    import torchvision

    scheduler = official_scheduler(set_alpha_to_one, float64_schedule)
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[max(steps - init_timestep, 0):]
    lat_hw = tuple(image_latent.shape[-2:])
    keep_map = torchvision.transforms.Resize(lat_hw, antialias=None)(keep_map)

    original_with_noise = scheduler.add_noise(image_latent, noise, timesteps)  # [N, C, H, W]
    n = steps if sdxl else len(timesteps)
    thresholds = (torch.arange(n, dtype=keep_map.dtype) + shift) / n
    masks = keep_map > thresholds.unsqueeze(1).unsqueeze(1)
    context = torch.cat([uncond, cond])
    latents = None
    for i, t in enumerate(timesteps):
        if i == 0:
            latents = original_with_noise[:1]
        else:
            mask = masks[i].unsqueeze(0).to(latents.dtype).unsqueeze(1)
            latents = original_with_noise[i] * mask + latents * (1 - mask)
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_input, t.expand(2), context=context)
        eps_uncond, eps_text = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def keep_map_at_image_size() -> torch.Tensor:
    """A white=keep map at 8x the latent: an 8-bit left-to-right gradient, a painted hard-edged
    keep=1 patch and a keep=0 patch off the 8-pixel grid (the resize's edges matter)."""
    side = LATENT * 8
    m = torch.round((torch.arange(side, dtype=torch.float32) + 0.5) / side * 255) / 255
    m = m.view(1, 1, side).expand(1, side, side).clone()
    m[:, 13:61, 21:70] = 1.0
    m[:, 85:120, 90:123] = 0.0
    return m


@pytest.fixture(scope="module")
def official_env(comfy):
    """The float64 tiny model, a float32 LATENT and noise, two float64 prompt embeddings. One CPU
    thread: float32 sums inside ComfyUI's sampler then do not depend on the thread count."""
    from tools.fixtures.models import build_model, random_conditioning

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(21)
    latent = torch.randn(1, 4, LATENT, LATENT, generator=gen) * 4.0  # ComfyUI LATENT (unscaled)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=gen)

    def cond(seed):
        c = random_conditioning(seed=seed)
        return [[c[0][0].to(DT), c[0][1]]]

    yield build_model(seed=3, dtype=DT), latent, noise, cond(4), cond(5)
    torch.set_num_threads(before)


def run_official(env, steps, **kw):
    model, latent, noise, pos, neg = env
    inner = model.model
    image_latent = inner.process_latent_in(latent.to(DT))  # what the official VAE path gives: scaled latent
    out = official_loop(inner.diffusion_model, image_latent, noise.to(DT), keep_map_at_image_size(), steps,
                        pos[0][0], neg[0][0], **kw)
    if not kw.get("set_alpha_to_one", False):
        # the official result stays at alphas_cumprod[0]; in ComfyUI's (VE) scale that is out / sqrt(a0)
        a0 = official_scheduler(float64_schedule=kw.get("float64_schedule", True)).alphas_cumprod[0]
        out = out / a0.sqrt()
    return inner.process_latent_out(out)


def run_ours(env, steps, *, final_sigma_min=True, denoise=1.0, total_steps=0):
    import comfy.sample
    import comfy.samplers

    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion
    from tools.fixtures.models import sample

    model, latent, noise, pos, neg = env
    m, lat = PlugKitDifferentialDiffusion.execute(
        model=model, samples={"samples": latent}, change_map=keep_map_at_image_size(),
        map_convention="white=keep", schedule="step", total_steps=total_steps).result
    if not final_sigma_min:
        return sample(m, latent, pos, neg, steps=steps, cfg=CFG, sampler="euler", scheduler="ddim_uniform",
                      noise_mask=lat["noise_mask"], noise=noise, denoise=denoise)
    sampling = m.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", steps).clone()
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    sigmas[-1] = sampling.sigma_min  # DDIM's final alpha: alphas_cumprod[0]
    return comfy.sample.sample_custom(m, noise, CFG, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                      latent, noise_mask=lat["noise_mask"], disable_pbar=True, seed=0)


@pytest.fixture(scope="module")
def ours_10(official_env):
    return run_ours(official_env, 10)  # shared by two tests (the machine is slow)


@pytest.mark.parametrize("steps", [8, 10, 50])
def test_step_schedule_equals_the_official_loop(official_env, ours_10, steps):
    ours = ours_10 if steps == 10 else run_ours(official_env, steps)
    official = run_official(official_env, steps)
    assert relative(ours, official) <= TOL, relative(ours, official)
    assert relative(ours, official_env[1]) > 1e-2  # it sampled something


def test_plain_ksampler_equals_the_official_loop_with_final_alpha_one(official_env):
    """KSampler (euler, ddim_uniform) ends at sigma 0: the official loop with set_alpha_to_one True."""
    ours = run_ours(official_env, 10, final_sigma_min=False)
    assert relative(ours, run_official(official_env, 10, set_alpha_to_one=True)) <= TOL


def test_denoise_below_one_sd2_and_sdxl_thresholds(official_env):
    """Official strength 0.6 of 10 steps = KSampler steps 6, denoise 0.6. SD2 thresholds over the 6
    steps run (our default); SDXL's over all 10 (our total_steps = 10). The two differ."""
    sd2 = run_official(official_env, 10, set_alpha_to_one=True, strength=0.6)
    sdxl = run_official(official_env, 10, set_alpha_to_one=True, strength=0.6, sdxl=True)
    ours_sd2 = run_ours(official_env, 6, final_sigma_min=False, denoise=0.6)
    ours_sdxl = run_ours(official_env, 6, final_sigma_min=False, denoise=0.6, total_steps=10)
    assert relative(ours_sd2, sd2) <= TOL, relative(ours_sd2, sd2)
    assert relative(ours_sdxl, sdxl) <= TOL, relative(ours_sdxl, sdxl)
    assert relative(sd2, sdxl) > 1000 * TOL


@pytest.mark.parametrize("shift", [-1, 1])
def test_a_rule_moved_by_one_step_fails(official_env, ours_10, shift):
    """Negative control: thresholds one step later (-1, this pack's rule before the fix) or earlier
    (+1) are far outside the tolerance, so the parity tests above would catch such a move."""
    assert relative(ours_10, run_official(official_env, 10, shift=shift)) > 1000 * TOL
