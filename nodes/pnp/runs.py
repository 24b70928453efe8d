"""The model runs PnP's nodes make themselves (through ComfyUI's own guider): the inversion, the
source prompt's probe and the feature-map probe. Sampling with injection is the user's sampler."""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..comfy_sampling import run_custom_sampler
from .blocks import model_family, unet_of
from .ddim_inversion import SourceTrajectory, ddim_invert
from .feature_pca import attention_pca_image, feature_pca_image, upscale_nearest
from .hooks import InjectionCall, add_capture, call_scope, install_feature_map_probe, plain_clone
from .pnp_source import PnPSource
from .schedule import check_sigmas, input_scale, inversion_schedule, trajectory_sigmas

log = logging.getLogger(__name__)


def source_branch_inputs(model, conditioning, latent: torch.Tensor, sigma: float) -> dict:
    """The U-Net inputs ComfyUI builds from ``conditioning`` (no model evaluation)."""
    m = plain_clone(model)
    store: dict = {}
    add_capture(m, store, run_model=False)

    def probe_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, x.new_ones([x.shape[0]]) * sigma, **(extra_args or {}))
        return x

    run_custom_sampler(m, conditioning, latent, torch.tensor([float(sigma), 0.0]), probe_fn)
    return store


def sampling_schedule(model, steps: int, scheduler: str, sigmas, node: str) -> tuple[torch.Tensor, str]:
    """(the trajectory's sigmas, the schedule's name): the connected SIGMAS, else the scheduler's."""
    if sigmas is not None:
        coarse, schedule_name = check_sigmas(sigmas, node), "custom SIGMAS"
    else:
        ms = model.get_model_object("model_sampling")
        coarse, schedule_name = comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu(), scheduler
    return trajectory_sigmas(coarse, schedule_name, steps, node), schedule_name


def invert_source(model, latent: torch.Tensor, conditioning, keep_desc: torch.Tensor, schedule_name: str,
                  n_inv: int, source_prompt, node: str, fixed_point_iterations: int = 0) -> tuple[PnPSource, torch.Tensor]:
    """DDIM-invert ``latent`` on ``keep_desc`` with about ``n_inv`` steps (``n_inv * (1 +
    fixed_point_iterations)`` model evaluations): (the PnPSource, the inverted latent at the first
    sampling step)."""
    unet = unet_of(model, node)
    ms = model.get_model_object("model_sampling")
    ascending, fine, positions = inversion_schedule(ms, keep_desc, n_inv, node)
    start = float(ascending[0])
    n_fine = fine.numel() - 1
    # trajectory points (positive sigmas, descending) and where each sits in ``fine``
    first = 0 if ascending.numel() == keep_desc.numel() - 1 else 1
    keep_positions = positions[first:]

    m = plain_clone(model)
    captured: dict = {}
    add_capture(m, captured)
    pbar = comfy.utils.ProgressBar(max(n_fine, 1))
    stored: dict = {}
    clean: dict = {}

    def progress(i, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(i, total)

    def invert_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        clean["x"] = x

        def eps_fn(x_lo, lo, hi):
            k = input_scale(ms, lo, hi)
            x_in = x_lo * k
            denoised = model_k(x_in, s_in * hi, **extra_args)
            return (x_in - denoised) / hi

        # the clean latent read as the latent at ``start`` (VP input = the clean latent itself)
        x_start = x * math.sqrt(1.0 + start * start)
        stored.update(ddim_invert(x_start, sigmas, eps_fn, keep=positions, callback=progress,
                                  fixed_point_iterations=fixed_point_iterations))
        return stored[positions[-1]]

    out = run_custom_sampler(m, conditioning, latent, fine, invert_fn)
    latents = torch.stack([stored[p].float().cpu() for p in reversed(keep_positions)] + [clean["x"].float().cpu()])
    trajectory = SourceTrajectory(keep_desc, latents)
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(f"{node}: the inversion produced NaN or infinite latents; check the model and the source latent.")
    if source_prompt is not None:
        model_kwargs = source_branch_inputs(model, source_prompt, latent, float(keep_desc[0]))
        source_conditioning, prompt_kind = source_prompt, "source_prompt"
    else:
        model_kwargs, source_conditioning, prompt_kind = captured, conditioning, "inversion prompt"
    source = PnPSource(
        trajectory=trajectory, model_kwargs=model_kwargs, conditioning=source_conditioning,
        family=model_family(model), decoder_blocks=len(unet.output_blocks), scheduler=schedule_name,
        steps=int(keep_desc.numel() - 1), inversion_steps=int(n_fine),
        extra={"source_prompt": prompt_kind, "inversion_start_sigma": start,
               "fixed_point_iterations": int(fixed_point_iterations)},
    )
    log.info("%s: inverted %s with %d model evaluations from sigma %.4g (%d stored latents, %.1f MiB); "
             "source branch prompt: %s", node, tuple(latent.shape), n_fine * (1 + int(fixed_point_iterations)), start,
             latents.shape[0],
             source.nbytes() / 2**20, prompt_kind)
    return source, out


def feature_map(model, source: PnPSource, block: int, step: int, kind: str, node: str) -> torch.Tensor:
    """(B, H, W, 3) images: the first three PCA components of decoder block ``block``'s features
    (``kind`` 'features') or self-attention at the source's ``step``, one model call on the source."""
    traj = source.trajectory
    m = plain_clone(model)
    install_feature_map_probe(m, block, kind)
    captured: list = []

    def observe(what, where, *tensors):
        if what == "features" and kind == "features" and where == block:
            captured.append(tensors[0].detach().float().cpu())
        elif what == "attention" and kind == "self-attention" and tuple(where or ()) == ("output", block):
            q, k, extra = tensors
            if extra.get("block_index", 0) == 0:
                shape = extra.get("activations_shape")
                captured.append((q.detach().float().cpu(), k.detach().float().cpu(), int(extra["n_heads"]), shape))

    sigma = float(traj.sigmas[step])
    x_src = traj.latents[step]
    batch = x_src.shape[0]

    def probe_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([batch])
        with call_scope(InjectionCall(n_total=batch, index=None, observe=observe)):
            model_k(x_src.to(x), s_in * sigma, **(extra_args or {}))
        return x

    run_custom_sampler(m, source.conditioning, torch.zeros(traj.shape), torch.tensor([sigma, 0.0]), probe_fn)
    if not captured:
        raise RuntimeError(f"{node}: no {kind} were captured from decoder block {block}; is another node replacing that block?")
    images = []
    factor_src = traj.shape[-1] * 8
    for i in range(batch):
        if kind == "features":
            img = feature_pca_image(captured[0][i])
        else:
            q, k, heads, shape = captured[0]
            h, w = int(shape[-2]), int(shape[-1])
            img = attention_pca_image(q[i], k[i], heads, h, w)
        images.append(upscale_nearest(img, max(1, factor_src // img.shape[1])))
    return torch.stack(images)
