"""A re-implementation of the official Plug-and-Play loops, for parity tests (test code only).

Written from MichalGeyer/pnp-diffusers (commit e9207c0): ``preprocess.py`` (``Preprocess.ddim_inversion``),
``pnp.py`` (``PNP.denoise_step``, ``init_pnp``, ``run_pnp``) and ``pnp_utils.py``
(``register_conv_control_efficient``, ``register_attention_control_efficient``), run on a ComfyUI
U-Net (``comfy.ldm...UNetModel``, called directly: no ComfyUI sampler, guider or PlugKit code).

- Scheduler: diffusers ``DDIMScheduler`` with Stable Diffusion's ``scheduler_config.json`` (the
  official ``DDIMScheduler.from_pretrained(model_key, subfolder="scheduler")``): scaled_linear betas
  0.00085-0.012, ``set_alpha_to_one=False``, ``steps_offset=1``, ``clip_sample=False``,
  ``timestep_spacing="leading"``. ``set_timesteps(n)`` gives ``981, 961, ..., 1`` for 50.
- Inversion (preprocess.py): over ``reversed(timesteps)``; ``alpha_prod_t_prev`` is
  ``final_alpha_cumprod`` (= ``alphas_cumprod[0]``) at the first step; ``eps = unet(latent, t)``;
  ``pred_x0 = (latent - sigma_prev * eps) / mu_prev``; ``latent = mu * pred_x0 + sigma * eps``; the
  latent after each step is saved under its ``t``. ``first_step_from_zero=True`` is the *wrong*
  variant (clean latent at alpha 1, i.e. sigma 0) kept only for the negative control.
- Sampling (pnp.py): batch ``[source latent at t, x, x]`` with embeddings ``[source prompt,
  negative, prompt]``; CFG ``uncond + 7.5 * (cond - uncond)``; ``scheduler.step(...)['prev_sample']``;
  injection while ``t`` is in ``timesteps[:int(n * pnp_f_t)]`` (features) and
  ``timesteps[:int(n * pnp_attn_t)]`` (q/k). ``window_shift`` moves both windows by whole steps
  (negative control only).
- Feature injection (register_conv_control_efficient): ``up_blocks[1].resnets[1]`` = ldm
  ``output_blocks[4][0]``: the hidden states after ``conv2`` (= the output of ComfyUI's
  ``out_layers``), before the shortcut, rows 1 and 2 overwritten with row 0.
- Attention injection (register_attention_control_efficient): ``up_blocks[1].attentions[1, 2]``,
  ``up_blocks[2..3].attentions[0..2]`` = ``output_blocks[4..11]``, ``transformer_blocks[0].attn1``:
  ``q = to_q(x)``, ``k = to_k(x)`` rows 1 and 2 overwritten with row 0; v untouched.

The official sampler ends at ``final_alpha_cumprod`` (its last ``prev_timestep`` is negative), not at
sigma 0 as ComfyUI: ``sample`` returns both the final latent and the last step's ``pred_x0`` (what
ComfyUI's last DDIM step to sigma 0 returns). The official runs fp16 under CUDA autocast; here fp32.
"""
from __future__ import annotations

import contextlib

import torch


def official_scheduler(n_steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                          timestep_spacing="leading")
    sched.set_timesteps(n_steps)
    return sched


def _eps(unet, latent, t, context):
    ts = torch.full((latent.shape[0],), float(t), dtype=latent.dtype)
    return unet(latent, timesteps=ts, context=context)


@torch.no_grad()
def invert(unet, latent: torch.Tensor, cond: torch.Tensor, n_steps: int, first_step_from_zero: bool = False) -> dict:
    """preprocess.py ``ddim_inversion``: {t: latent saved after the step to t} (VP latents)."""
    sched = official_scheduler(n_steps)
    timesteps = list(reversed(sched.timesteps.tolist()))
    saved = {}
    for i, t in enumerate(timesteps):
        cond_batch = cond.repeat(latent.shape[0], 1, 1)
        alpha_prod_t = sched.alphas_cumprod[t]
        if i > 0:
            alpha_prod_t_prev = sched.alphas_cumprod[timesteps[i - 1]]
        else:
            alpha_prod_t_prev = torch.tensor(1.0) if first_step_from_zero else sched.final_alpha_cumprod
        mu, mu_prev = alpha_prod_t ** 0.5, alpha_prod_t_prev ** 0.5
        sigma, sigma_prev = (1 - alpha_prod_t) ** 0.5, (1 - alpha_prod_t_prev) ** 0.5
        eps = _eps(unet, latent, t, cond_batch)
        pred_x0 = (latent - sigma_prev * eps) / mu_prev
        latent = mu * pred_x0 + sigma * eps
        saved[int(t)] = latent
    return saved


def _feature_block(unet, block: int):
    return unet.output_blocks[block][0]


def _self_attentions(unet, blocks):
    from comfy.ldm.modules.attention import SpatialTransformer

    out = []
    for b in blocks:
        for mod in unet.output_blocks[b]:
            if isinstance(mod, SpatialTransformer):
                out.append(mod.transformer_blocks[0].attn1)
    return out


@contextlib.contextmanager
def official_injection(unet, state: dict, feature_block: int = 4, attention_blocks=range(4, 12)):
    """Forward hooks reproducing pnp_utils.py's overwrites while ``state['features'/'attention']``."""

    def inject(flag):
        def hook(module, inputs, output):
            if not state[flag]:
                return None
            out = output.clone()
            n = out.shape[0] // 3
            out[n:2 * n] = out[:n]
            out[2 * n:] = out[:n]
            return out
        return hook

    handles = [_feature_block(unet, feature_block).out_layers.register_forward_hook(inject("features"))]
    for attn in _self_attentions(unet, attention_blocks):
        handles.append(attn.to_q.register_forward_hook(inject("attention")))
        handles.append(attn.to_k.register_forward_hook(inject("attention")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sample(unet, source_latents: dict, source_cond: torch.Tensor, negative: torch.Tensor, prompt: torch.Tensor,
           n_steps: int, pnp_f_t: float, pnp_attn_t: float, guidance_scale: float = 7.5, window_shift: int = 0):
    """pnp.py ``run_pnp`` / ``sample_loop`` / ``denoise_step``; returns (final latent, last pred_x0)."""
    sched = official_scheduler(n_steps)
    timesteps = sched.timesteps
    conv_t = int(n_steps * pnp_f_t) + window_shift
    qk_t = int(n_steps * pnp_attn_t) + window_shift
    conv_steps = set(timesteps[:conv_t].tolist()) if conv_t >= 0 else set()
    qk_steps = set(timesteps[:qk_t].tolist()) if qk_t >= 0 else set()
    state = {"features": False, "attention": False}
    x = source_latents[int(timesteps[0])]
    text_embed_input = torch.cat([source_cond, negative, prompt], dim=0)
    pred_x0 = None
    with official_injection(unet, state):
        for t in timesteps.tolist():
            latent_model_input = torch.cat([source_latents[int(t)]] + [x] * 2)
            state["features"] = t in conv_steps or t == 1000
            state["attention"] = t in qk_steps or t == 1000
            noise_pred = _eps(unet, latent_model_input, t, text_embed_input)
            _, noise_pred_uncond, noise_pred_cond = noise_pred.chunk(3)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            out = sched.step(noise_pred, t, x)
            x, pred_x0 = out["prev_sample"], out["pred_original_sample"]
    return x, pred_x0
