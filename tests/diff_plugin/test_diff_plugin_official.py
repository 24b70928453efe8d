"""Parity with the official Diff-Plugin pipeline (yuhaoliu7456/Diff-Plugin: modules/TPB.py,
modules/SCB.py, infer.py), on random weights, using the reference libraries the official code runs on:
transformers' CLIPVisionModel and diffusers' building blocks / UNet2DConditionModel / UniPC scheduler.

The official SCB is rebuilt here from diffusers blocks exactly as modules/SCB.py builds and runs it
(test code only; the pack has its own torch implementation), and the released-layout state dict
(diffusers key names) is loaded into both strictly.

diffusers version note: the official code targets diffusers 0.17, where
``UNet2DConditionModel(..., down_block_additional_residuals=r)`` adds ``r`` to the skip features. In
current diffusers, down residuals *without* a mid-block residual are taken as T2I-Adapter residuals
(added inside the encoder instead); passing a zero ``mid_block_additional_residual`` selects the
ControlNet path, which is exactly the 0.17 behaviour (the mid residual of 0.17 was optional).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diff_plugin_testlib import random_state, write_released_plugin

import diffusers  # noqa: E402,F401  (tests/requirements.txt pins it: a missing install fails, not skips)
import transformers  # noqa: E402,F401


# --- the official SCB, from diffusers blocks (as modules/SCB.py with the released config) ------------

class OfficialSCB(nn.Module):
    """modules/SCB.py ``SCBNet`` for the released config: block_out_channels [C], one
    CrossAttnDownBlock2D without downsampler, attention_head_dim 8 (= 8 heads in diffusers 0.17's
    ``attn_num_head_channels``), cross-attention 768, Timesteps(flip_sin_to_cos=True, shift 0)."""

    def __init__(self, channels: int = 320, layers: int = 2, heads: int = 8, cross_attention_dim: int = 768):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

        self.controlnet_cond_embedding = nn.Conv2d(4, channels, kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels, True, 0)
        self.time_embedding = TimestepEmbedding(channels, channels * 4, act_fn="silu")
        self.down_blocks = nn.ModuleList([CrossAttnDownBlock2D(
            in_channels=channels, out_channels=channels, temb_channels=channels * 4, num_layers=layers,
            resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=32, num_attention_heads=heads,
            cross_attention_dim=cross_attention_dim, downsample_padding=1, add_downsample=False,
            use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
            resnet_time_scale_shift="default")])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(channels, channels, 1) for _ in range(layers + 1)])

    def forward(self, sample, timestep, encoder_hidden_states, cond_img):
        """SCBNet.forward (guess_mode False, conditioning_scale 1), padded with zeros to 12 residuals."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.int64, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        sample = self.controlnet_cond_embedding(cond_img)
        res = (sample,)
        for block in self.down_blocks:
            sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            res += res_samples
        out = [conv(r) for r, conv in zip(res, self.controlnet_down_blocks)]
        return out + [torch.zeros(1, device=out[-1].device) for _ in range(12 - len(out))]


def official_scb(state: dict, channels: int) -> OfficialSCB:
    scb = OfficialSCB(channels).eval()
    scb.load_state_dict(state, strict=True)  # the released key names, no mapping
    return scb


# --- a. image features ------------------------------------------------------------------------------

def hf_clip_vision(comfy_clip_vision, layers: int = 2, intermediate: int = 256):
    """transformers' CLIPVisionModel with the tiny config, holding the ComfyUI model's weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=768, attention_dropout=0.0)
    hf = CLIPVisionModel(config).eval()
    sd = comfy_clip_vision.model.state_dict()
    # ComfyUI keeps transformers' key names for the vision tower; its extra key is the projection
    # (CLIPVisionModelWithProjection's visual_projection), which CLIPVisionModel does not have.
    mapped = {k: v for k, v in sd.items() if not k.startswith("visual_projection.")}
    assert set(sd) - set(mapped) == {"visual_projection.weight"}
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("position_ids") for k in missing), missing  # a buffer, not a weight
    return hf


def test_tpb_input_equals_transformers_last_layer_without_class_token(comfy, tiny_clip_vision, tiny_vae, tiny_model):
    import comfy.clip_vision

    from plugkit.nodes.diff_plugin.nodes import PlugKitApplyTaskPlugin
    from plugkit.nodes.diff_plugin.hooks import PluginHandle
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    plugin = TaskPlugin("derain", scb_channels=32)
    plugin.load_state_dict(random_state(plugin, 3))
    handle = PluginHandle(plugin)
    fed = []
    hook = handle.plugin.tpb.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone()))
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(1, 96, 160, 3, generator=gen)  # not square: the centre crop matters
    try:
        _, positive, _ = PlugKitApplyTaskPlugin.execute(model=tiny_model, plugin=handle, clip_vision=tiny_clip_vision,
                                                        vae=tiny_vae, image=image, resize="none").result
    finally:
        hook.remove()
    assert len(fed) == 1 and fed[0].shape == (1, 256, 1024)

    cv = tiny_clip_vision
    pixel_values = comfy.clip_vision.clip_preprocess(image, size=cv.image_size, mean=cv.image_mean,
                                                     std=cv.image_std, crop=True).float()
    hf = hf_clip_vision(cv)
    with torch.no_grad():
        out = hf(pixel_values=pixel_values, output_hidden_states=True)
    official = out.hidden_states[-1][:, 1:]  # modules/TPB.py: hidden_states[24][:, 1:] for ViT-L/14
    assert len(out.hidden_states) == 2 + 1
    assert official.abs().max() > 0.1
    torch.testing.assert_close(fed[0], official, rtol=1e-5, atol=1e-5)
    # ... and before the post-layernorm: the normed tokens are something else.
    normed = hf.vision_model.post_layernorm(out.last_hidden_state)[:, 1:]
    assert not torch.allclose(fed[0], normed, atol=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(positive[0][0], handle.plugin.tpb(official), rtol=1e-5, atol=1e-5)


# --- b. SCB -----------------------------------------------------------------------------------------

def _scb_inputs(channels_hw: int = 16, seed: int = 0, batch: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, channels_hw, channels_hw, generator=gen)
    fp = torch.randn(batch, 256, 768, generator=gen)
    return latent, fp


@pytest.mark.parametrize("t", [999, 500, 1])
def test_scb_equals_official_small_channels(t):
    from plugkit.nodes.diff_plugin.task_plugin import SpatialComplementBranch

    ours = SpatialComplementBranch(channels=32).eval()
    state = random_state(ours, seed=11)
    ours.load_state_dict(state, strict=True)
    ref = official_scb(state, 32)
    latent, fp = _scb_inputs(seed=t)
    with torch.no_grad():
        got = ours(latent, torch.tensor([t]), fp)
        want = ref(torch.zeros_like(latent), torch.tensor(t), fp, latent)
    assert len(got) == 3 and all(w.numel() == 1 and w.abs().max() == 0 for w in want[3:])
    for g, w in zip(got, want[:3]):
        assert w.abs().max() > 1e-2
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_scb_equals_official_released_320_channel_files(comfy, tmp_path):
    """The released layout (scb/config.json + diffusion_pytorch_model.bin + tpb.pt) through our loader,
    the same .bin loaded strictly into the official diffusers SCB."""
    from plugkit.nodes.diff_plugin import plugin_files

    folder, scb_state, _ = write_released_plugin(tmp_path, "derain", seed=2)
    ours = plugin_files.load_plugin(folder, name="derain").scb.eval()
    ref = official_scb(torch.load(folder / "scb" / "diffusion_pytorch_model.bin", weights_only=True), 320)
    latent, fp = _scb_inputs(channels_hw=8, seed=4, batch=2)
    with torch.no_grad():
        got = ours(latent, torch.tensor([949, 949]), fp)
        want = ref(torch.zeros_like(latent), torch.tensor(949), fp, latent)
    for g, w in zip(got, want[:3]):
        assert w.abs().max() > 1e-2
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# --- c. one denoising step of the whole model ---------------------------------------------------------

def diffusers_unet(model):
    """The tiny ComfyUI SD1.x U-Net as a diffusers UNet2DConditionModel with the same weights
    (key map from ComfyUI's own comfy.utils.unet_to_diffusers)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = model.model.model_config.unet_config
    ch = unet_config["model_channels"]
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(ch * m for m in unet_config["channel_mult"]), layers_per_block=2,
        cross_attention_dim=unet_config["context_dim"], attention_head_dim=unet_config["num_heads"],
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1,
    ).eval()
    key_map = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ldm key
    ldm = model.model.diffusion_model.state_dict()
    # The map lists every key the layout may have (e.g. skip convs that blocks with equal in/out
    # channels lack); keep those this U-Net has, then demand a one-to-one, strict match.
    sd = {dk: ldm[lk] for dk, lk in key_map.items() if lk in ldm}
    assert set(sd) == set(unet.state_dict()), set(unet.state_dict()) ^ set(sd)
    assert {key_map[dk] for dk in sd} == set(ldm)
    unet.load_state_dict(sd, strict=True)
    return unet


def comfy_denoised(model, positive, x_k: torch.Tensor, sigma: float) -> torch.Tensor:
    """ComfyUI's model output (denoised) for x_k at sigma, through the sampler's own machinery
    (CFGGuider: conds processed, the SCB control's pre_run / get_control / cleanup), cfg 1."""
    import comfy.samplers

    seen = []

    def one_call(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        seen.append(model_fn(x, s, **(extra_args or {})).detach().clone())
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, [])
    guider.set_cfg(1.0)
    sigmas = torch.tensor([sigma, 0.0])
    scale = model.get_model_object("latent_format").scale_factor
    # KSampler's path: the latent goes through process_latent_in (x scale_factor); zero noise.
    guider.sample(torch.zeros_like(x_k), x_k / scale, comfy.samplers.KSAMPLER(one_call), sigmas,
                  disable_pbar=True, seed=0)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def step_setup(comfy, tiny_clip_vision, tiny_vae):
    from plugkit.nodes.diff_plugin.nodes import PlugKitApplyTaskPlugin
    from plugkit.nodes.diff_plugin.hooks import PluginHandle
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin
    from tools.fixtures.models import build_model

    model = build_model(seed=0)
    plugin = TaskPlugin("derain", scb_channels=32)
    state = random_state(plugin, 5)
    plugin.load_state_dict(state)
    handle = PluginHandle(plugin)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 128, 128, 3, generator=gen)
    m, positive, latent = PlugKitApplyTaskPlugin.execute(model=model, plugin=handle, clip_vision=tiny_clip_vision,
                                                         vae=tiny_vae, image=image, resize="none").result
    scb_state = {k[len("scb."):]: v for k, v in state.items() if k.startswith("scb.")}
    return m, positive, latent, official_scb(scb_state, 32), diffusers_unet(m)


def official_eps(unet, scb, x_t, t: int, fp, scb_cond):
    """infer.py's step body: SCB residuals, then the U-Net with them (0.17 semantics, see the module doc)."""
    with torch.no_grad():
        residuals = scb(x_t, torch.tensor(t), encoder_hidden_states=fp, cond_img=scb_cond)
        mid = torch.zeros(1)
        return unet(x_t, torch.tensor(t), encoder_hidden_states=fp, down_block_additional_residuals=residuals,
                    mid_block_additional_residual=mid).sample


@pytest.mark.parametrize("t", [999, 949, 500, 50])
def test_one_step_noise_prediction_equals_official(step_setup, t):
    m, positive, latent, scb, unet = step_setup
    ms = m.get_model_object("model_sampling")
    sigma = float(ms.sigmas[t])
    assert int(ms.timestep(torch.tensor([sigma]))[0]) == t
    scb_cond = positive[0][1]["control"].cond_latent  # 0.18215 x posterior mean of the degraded image
    gen = torch.Generator().manual_seed(t)
    x_t = torch.randn(scb_cond.shape, generator=gen)  # diffusers' (VP) noisy latent
    x_k = x_t * math.sqrt(1.0 + sigma ** 2)  # ComfyUI's (k-diffusion, VE) form of the same point
    fp = positive[0][0]
    want = official_eps(unet, scb, x_t, t, fp, scb_cond)
    denoised = comfy_denoised(m, positive, x_k, sigma)
    got = (x_k - denoised) / sigma  # ComfyUI's eps prediction
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the plugin does act on this step: without the SCB residuals the official output differs
    with torch.no_grad():
        plain = unet(x_t, torch.tensor(t), encoder_hidden_states=fp).sample
    assert (plain - want).abs().max() > 1e-3


# --- d. the whole official sampling loop ----------------------------------------------------------------

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json, which infer.py loads into UniPC.
SD14_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
TIME_THRESHOLD = 960  # infer.py --time_threshold


def official_loop(eps_fn, scb_cond, noise, steps: int = 20, random_noise: bool = False,
                  threshold: int = TIME_THRESHOLD):
    """infer.py's loop: UniPC (diffusers defaults: bh2, order 2, data prediction) with SD's scheduler
    config; the latent is the degraded latent noised at every t >= 960 (only t = 999 for 20 steps;
    999 and 961 for 26; 999 and 979 for 50), or, with ``--inp_of_unet_is_random_noise``, the noise
    itself and never re-noised; then eps -> scheduler.step. ``final_sigmas_type='sigma_min'`` keeps
    diffusers 0.17's last step (to t = 0), where current diffusers defaults to sigma 0."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    latents = noise.clone() if random_noise else None
    for t in timesteps:
        if t >= threshold and not random_noise:
            latents = scheduler.add_noise(scb_cond, noise, t.reshape(1))
        with torch.no_grad():
            eps = eps_fn(latents, int(t))
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents, timesteps


@pytest.fixture(scope="module")
def loops(step_setup):
    import comfy.sample

    from tools.fixtures.models import sample

    m, positive, latent, scb, unet = step_setup
    scb_cond = positive[0][1]["control"].cond_latent.detach()
    fp = positive[0][0]
    noise = comfy.sample.prepare_noise(latent["samples"], 42, None)  # KSampler's noise for seed 42
    ms = m.get_model_object("model_sampling")
    official, timesteps = official_loop(lambda x, t: official_eps(unet, scb, x, t, fp, scb_cond), scb_cond, noise)

    def comfy_eps(x_t, t):
        sigma = float(ms.sigmas[t])
        x_k = x_t * math.sqrt(1.0 + sigma ** 2)
        return (x_k - comfy_denoised(m, positive, x_k, sigma)) / sigma

    official_with_comfy_model, _ = official_loop(comfy_eps, scb_cond, noise)
    scale = m.get_model_object("latent_format").scale_factor
    graph = sample(m, latent["samples"], positive, [], steps=20, cfg=1.0, sampler="uni_pc_bh2", scheduler="normal",
                   seed=42).detach() * scale  # KSampler's output is process_out()'d: back to the scaled latent space
    return official.detach(), official_with_comfy_model.detach(), graph, timesteps


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_official_loop_driven_by_comfyui_model_calls_equals_official(loops):
    """The official loop (start latent, timestep grid, UniPC solver) with every model evaluation done
    by ComfyUI with our plugin applied gives the official result: all of the model side matches."""
    official, with_comfy, _, timesteps = loops
    assert timesteps.tolist()[:3] == [999, 949, 899] and len(timesteps) == 20
    assert official.std() > 0.1
    torch.testing.assert_close(with_comfy, official, rtol=1e-4, atol=1e-4)


def test_ksampler_uni_pc_bh2_vs_official_loop(loops):
    """Our graph (KSampler uni_pc_bh2 / normal, 20 steps, cfg 1) is NOT the official solver: ComfyUI's
    UniPC runs order 3 on its own sigma grid (ends at sigma 0.001) and noises the first step with
    sqrt(1 + sigma^2), where the official loop is diffusers' order-2 UniPC on t = 999, 949, ..., 50.
    Measured on this random tiny model: relative L2 difference 0.079 (max 0.54 at latent std 0.93),
    the same 0.079 with the official timestep grid given as custom sigmas, i.e. the solver, not the
    grid. This test only checks the two land in the same place to within that solver difference;
    parity of the model itself is the test above (1e-4)."""
    official, _, graph, _ = loops
    rel = _rel(graph, official)
    assert rel < 0.2, rel
    assert torch.isfinite(graph).all()


# --- e. our implementation of the official sampler ----------------------------------------------------

def test_official_timesteps_and_sigmas(comfy, step_setup):
    from diffusers import UniPCMultistepScheduler

    from plugkit.nodes.diff_plugin.official_unipc import official_sigmas, official_timesteps

    for steps in (1, 3, 20, 26, 50):  # 26: numpy's linspace decides t = 499 (torch's would give 500)
        scheduler = UniPCMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG, final_sigmas_type="sigma_min")
        scheduler.set_timesteps(steps)
        assert official_timesteps(steps) == scheduler.timesteps.tolist()
        ms = step_setup[0].get_model_object("model_sampling")
        torch.testing.assert_close(official_sigmas(ms.sigma, steps), scheduler.sigmas.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 26, 50])
def test_official_unipc_solver_equals_diffusers(comfy, steps):
    """The solver alone, on a smooth stand-in eps(x, t) (no network), against diffusers' scheduler and
    infer.py's loop, re-noising included (t >= 960: one step at 20 steps, two at 26 and 50). Moving the
    re-noising rule by one step (one step fewer or one more) fails (asserted below, for 26 and 50)."""
    from plugkit.nodes.diff_plugin.official_unipc import (official_sigmas, official_timesteps, renoise_flags,
                                                          sample_official_unipc)

    gen = torch.Generator().manual_seed(steps)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    weight = torch.randn(4, 4, generator=gen) * 0.3

    def eps_fn(x_vp, t):  # depends on x and t, like a network would
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x_vp)) * (0.5 + t / 1000.0) + 0.1 * x_vp

    official, _ = official_loop(eps_fn, x0, noise, steps=steps)

    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG, final_sigmas_type="sigma_min")
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5

    def sigma_of_t(ts):
        return table[ts.long()]

    sigmas = official_sigmas(sigma_of_t, steps)

    def model(x, sigma):  # ComfyUI's convention: x = x_vp / alpha, returns the denoised x0
        s = float(sigma[0])
        t = int((table - s).abs().argmin())
        return x - s * eps_fn(x / math.sqrt(1 + s * s), t)

    flags = renoise_flags(official_timesteps(steps))
    assert sum(flags) == {26: 2, 50: 2}.get(steps, 1)

    def run(renoise):
        x = x0 + noise * float(sigmas[0])  # infer.py's add_noise at t = 999, in ComfyUI's form
        out = sample_official_unipc(model, x, sigmas, renoise=renoise, renoise_latent=x0, renoise_noise=noise)
        return out / math.sqrt(1 + float(sigmas[-1]) ** 2)

    torch.testing.assert_close(run(flags), official, rtol=1e-5, atol=1e-5)
    if steps in (26, 50):
        fewer = flags[:sum(flags) - 1]  # re-noise one step fewer (the old behaviour: the first step only)
        more = [True] * (sum(flags) + 1)  # one step more
        for moved in (fewer, more):
            assert (run(moved) - official).abs().max() > 1e-3


def test_run_chain_official_sampler_equals_official_loop(loops, step_setup):
    """PlugKitRunPluginChain's default sampler reproduces infer.py end to end (model, start, solver,
    grid and final latent): the official loop's result to 1e-4."""
    import comfy.sample

    from plugkit.nodes.diff_plugin.runs import sample_official

    official = loops[0]
    m, positive, latent, _, _ = step_setup
    noise = comfy.sample.prepare_noise(latent["samples"], 42, None)  # the noise the loops fixture used
    steps_seen = []
    ours = sample_official(m, positive, latent, noise, 20, False, callback=lambda step, *_: steps_seen.append(step))
    scale = m.get_model_object("latent_format").scale_factor
    torch.testing.assert_close(ours * scale, official, rtol=1e-4, atol=1e-4)
    assert steps_seen == list(range(20))
    assert _rel(loops[2], official) > 1e-2  # ComfyUI's uni_pc_bh2 really is a different solver
