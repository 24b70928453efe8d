"""Plug-and-Play nodes: PlugKitPnPInvert, PlugKitPnPInject, PlugKitFeatureMap.

Technique: Tumanyan, Geyer, Bagon, Dekel, "Plug-and-Play Diffusion Features for Text-Driven
Image-to-Image Translation" (CVPR 2023); official code MichalGeyer/pnp-diffusers (MIT). This pack's
code is written from the paper and that code, not copied. The math lives in ``ddim_inversion`` and
``feature_pca``; the U-Net hooks in ``injection``; this file is glue.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils

from ..comfy_io import io, ui
from . import injection as inj
from .ddim_inversion import (
    OFFICIAL_INVERSION_STEPS,
    SourceTrajectory,
    ddim_invert,
    describe_sigmas,
    interval_substeps,
    subdivide_schedule,
)
from .feature_pca import attention_pca_image, feature_pca_image, upscale_nearest
from .pnp_source import PnPSource

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Plug-and-Play"
PAPER = "https://arxiv.org/abs/2211.12572"
PnPSourceType = io.Custom("PLUGKIT_PNP_SOURCE")
DEFAULT_INVERSION_STEPS = 50  # = steps: see the reconstruction table in docs/pnp.md
RESOLUTIONS = ("inversion_steps", "official 999")
KINDS = ("features", "self-attention")


def run_custom_sampler(model, conditioning, latent: torch.Tensor, sigmas: torch.Tensor, sampler_fn: Callable):
    """Run ``sampler_fn`` (a k-diffusion style function) through ComfyUI's own guider, without CFG.

    ComfyUI then builds the model inputs from ``conditioning``, loads the model with its patches
    and runs every wrapper, exactly as a sampler node would. Returns the guider's output latent.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = torch.zeros_like(latent)
    out = guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas, disable_pbar=True, seed=0)
    return out.to(comfy.model_management.intermediate_device())


def input_scale(model_sampling, sigma_from: float, sigma_to: float) -> float:
    """Factor that makes the model see a latent at ``sigma_from`` while told ``sigma_to``."""
    one = torch.ones(1)
    a = model_sampling.calculate_input(torch.tensor([float(sigma_from)]), one)
    b = model_sampling.calculate_input(torch.tensor([float(sigma_to)]), one)
    return float(a / b)


def timestep_warp(model_sampling):
    """(sigma -> timestep, timestep -> sigma) on the CPU, wherever the model's buffers live."""
    buffers = list(model_sampling.buffers()) if isinstance(model_sampling, torch.nn.Module) else []
    device = buffers[0].device if buffers else torch.device("cpu")

    def to_t(sigma):
        return model_sampling.timestep(sigma.to(device)).float().cpu()

    def to_sigma(t):
        return model_sampling.sigma(t.to(device)).float().cpu()

    return to_t, to_sigma


def _capture_source_inputs(store: dict, run_model: bool = True):
    """APPLY_MODEL wrapper storing the first call's U-Net inputs (one row per item); with
    ``run_model=False`` the model is not evaluated (a probe that only needs the inputs)."""
    def capture(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if not store:
            chunks = max(len(transformer_options.get("cond_or_uncond", [0])), 1)
            rows = x.shape[0] // chunks
            if torch.is_tensor(c_crossattn):
                store["c_crossattn"] = c_crossattn[:rows].detach().float().cpu()
            if torch.is_tensor(c_concat):
                store["c_concat"] = c_concat[:rows].detach().float().cpu()
            for key, value in kwargs.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == x.shape[0]:
                    store[key] = value[:rows].detach().cpu()
        if not run_model:
            return torch.zeros_like(x)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return capture


PNP_WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                     comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING)


def plain_clone(model):
    """A clone without PlugKitPnPInject's wrappers (inversion and probes are not PnP runs)."""
    m = model.clone()
    for wtype in PNP_WRAPPER_TYPES:
        m.remove_wrappers_with_key(wtype, inj.WRAPPER_KEY)
    inj.remove_memory_estimate(m)
    return m


def source_branch_inputs(model, conditioning, latent: torch.Tensor, sigma: float) -> dict:
    """The U-Net inputs ComfyUI builds from ``conditioning`` (no model evaluation)."""
    m = plain_clone(model)
    store: dict = {}
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "plugkit_pnp_capture",
                           _capture_source_inputs(store, run_model=False))

    def probe_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, x.new_ones([x.shape[0]]) * sigma, **(extra_args or {}))
        return x

    run_custom_sampler(m, conditioning, latent, torch.tensor([float(sigma), 0.0]), probe_fn)
    return store


def _check_sigmas(sigmas, node: str) -> torch.Tensor:
    s = torch.as_tensor(sigmas).detach().float().cpu().flatten()
    if s.numel() < 2 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s[1:] >= s[:-1]).any()):
        raise ValueError(
            f"{node}: input 'sigmas' must be a strictly decreasing list of at least two finite sigmas >= 0 "
            f"(a scheduler node's SIGMAS); got {describe_sigmas(s) if s.numel() else '[]'}."
        )
    if float(s[-1]) > 0:
        s = torch.cat([s, s.new_zeros(1)])  # the trajectory always ends at the clean latent
    return s


def inversion_schedule(model_sampling, keep_desc: torch.Tensor, inversion_steps: int, node: str = "PlugKitPnPInvert"):
    """(ascending coarse points, fine inversion sigmas, positions of the coarse points in ``fine``).

    ``keep_desc``: the sampling schedule's sigmas (descending, ending with 0). The inversion starts
    where the official one does: the clean latent sits at ``alphas_cumprod[0]``, the model's
    ``sigma_min`` (a schedule reaching below it starts at sigma 0). Each interval gets
    ``interval_substeps`` steps, uniform in the model's timestep.
    """
    positive = keep_desc[:-1].flip(0)
    sigma_start = float(model_sampling.sigma_min)
    lowest = float(positive[0])
    if abs(lowest - sigma_start) <= 1e-5 * sigma_start:
        ascending = positive
    elif lowest > sigma_start:
        ascending = torch.cat([positive.new_tensor([sigma_start]), positive])
    else:
        log.info("%s: the schedule goes below sigma_min %.4g; inverting from sigma 0", node, sigma_start)
        ascending = torch.cat([positive.new_zeros(1), positive])
    to_t, to_sigma = timestep_warp(model_sampling)
    t_points = to_t(ascending)
    if float(ascending[0]) == 0.0:
        t_points[0] = 0.0
    fine, positions = subdivide_schedule(ascending, interval_substeps(t_points, inversion_steps), to_t, to_sigma)
    return ascending, fine, positions


class PlugKitPnPInvert(io.ComfyNode):
    """DDIM-inverts a source latent with the model's own prediction; keeps the trajectory."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitPnPInvert",
            display_name="Plug-and-Play Invert (PlugKit)",
            category=CATEGORY,
            description=(
                "Deterministic DDIM inversion of the source image (Plug-and-Play, Tumanyan et al. 2023). "
                "Feed PNP_SOURCE to 'Plug-and-Play Inject' and LATENT to KSamplerAdvanced (add_noise disabled, "
                "same steps and scheduler) or to SamplerCustom with the SIGMAS connected here too. "
                "A run on other sigmas is refused."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The U-Net model (SD1.x, SD2.x or SDXL) used for inversion and sampling."),
                io.Latent.Input("samples", tooltip="The VAE-encoded source image (VAE Encode)."),
                io.Conditioning.Input("conditioning", tooltip="The inversion prompt. The official default is the empty prompt: CLIP Text Encode with an empty text."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps of the run that will use this source (the official code uses 50). Use the same number in the sampler; another count is refused."),
                io.Int.Input("inversion_steps", default=DEFAULT_INVERSION_STEPS, min=1, max=1000, optional=True,
                             tooltip="Inversion resolution: about this many model evaluations, spread uniformly over the model's 1000 timesteps (at least one per sampling step). 50 = one per step of a 50-step run (fast). More = better reconstruction, slower. Used when inversion_resolution is 'inversion_steps'."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform", optional=True,
                               tooltip="The sampler's scheduler (ignored when 'sigmas' is connected). ddim_uniform with the ddim sampler and the same steps reproduces the official method; the sampler must use this scheduler and step count."),
                io.Combo.Input("inversion_resolution", options=list(RESOLUTIONS), default=RESOLUTIONS[0], optional=True,
                               tooltip="'official 999': invert with one step per model timestep, as the official preprocess.py (999 steps; best reconstruction, about 20x slower than 50). 'inversion_steps': use the inversion_steps input."),
                io.Conditioning.Input("source_prompt", optional=True,
                                      tooltip="The source branch's prompt during sampling. The official code always uses the empty prompt there: connect CLIP Text Encode with an empty text (the shipped workflow does). Unconnected: the inversion prompt (the same when that is empty, the official default)."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional: the sampler's own SIGMAS (e.g. BasicScheduler into SamplerCustom). The source is then inverted exactly on them and 'steps'/'scheduler' are ignored: any scheduler, step count or denoise is exact."),
            ],
            outputs=[
                PnPSourceType.Output(display_name="PNP_SOURCE", tooltip="The inverted source trajectory and its conditioning, for Plug-and-Play Inject and Feature Map."),
                io.Latent.Output(display_name="LATENT", tooltip="The inverted latent at the first sampling step: sample it with add_noise disabled."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, conditioning, steps=50, inversion_steps=DEFAULT_INVERSION_STEPS,
                scheduler="ddim_uniform", inversion_resolution=RESOLUTIONS[0], source_prompt=None,
                sigmas=None) -> io.NodeOutput:
        node = "PlugKitPnPInvert"
        unet = inj.unet_of(model, node)
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise ValueError(f"{node}: input 'scheduler' is {scheduler!r}; use one of {list(comfy.samplers.SCHEDULER_NAMES)}.")
        if inversion_resolution not in RESOLUTIONS:
            raise ValueError(f"{node}: input 'inversion_resolution' is {inversion_resolution!r}; use one of {list(RESOLUTIONS)}.")
        if not conditioning:
            raise ValueError(f"{node}: input 'conditioning' is empty; connect a CLIP Text Encode (empty text is the official choice).")
        if source_prompt is not None and not source_prompt:
            raise ValueError(f"{node}: input 'source_prompt' is empty; connect a CLIP Text Encode with an empty text, or leave it unconnected.")
        latent = samples["samples"]
        if latent.is_nested or latent.dim() != 4:
            raise ValueError(f"{node}: input 'samples' must be an image latent (batch, channels, height, width); got {tuple(latent.shape)}.")
        if latent.shape[-1] < 16 or latent.shape[-2] < 16:
            raise ValueError(f"{node}: input 'samples' is {latent.shape[-1]}x{latent.shape[-2]} (latent); use an image of at least 128x128 px.")
        if not bool(torch.isfinite(latent).all()):
            raise ValueError(f"{node}: input 'samples' contains NaN or infinite values; re-encode the source image.")
        ms = model.get_model_object("model_sampling")
        if sigmas is not None:
            coarse = _check_sigmas(sigmas, node)
            schedule_name = "custom SIGMAS"
        else:
            coarse = comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu()
            schedule_name = scheduler
        keep_desc = torch.cat([coarse[:-1][coarse[:-1] > 0], coarse.new_zeros(1)])
        if keep_desc.numel() < 2 or bool((keep_desc[1:] >= keep_desc[:-1]).any()):
            raise ValueError(f"{node}: the {schedule_name} schedule for {steps} steps is not strictly decreasing; pick another scheduler or step count.")
        n_inv = OFFICIAL_INVERSION_STEPS if inversion_resolution == "official 999" else int(inversion_steps)
        if n_inv < 1:
            raise ValueError(f"{node}: input 'inversion_steps' is {inversion_steps}; use at least 1.")
        ascending, fine, positions = inversion_schedule(ms, keep_desc, n_inv, node)
        start = float(ascending[0])
        n_fine = fine.numel() - 1
        # trajectory points (positive sigmas, descending) and where each sits in ``fine``
        first = 0 if ascending.numel() == keep_desc.numel() - 1 else 1
        keep_positions = positions[first:]

        m = plain_clone(model)
        captured: dict = {}
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "plugkit_pnp_capture", _capture_source_inputs(captured))
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
            stored.update(ddim_invert(x_start, sigmas, eps_fn, keep=positions, callback=progress))
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
            family=inj.model_family(model), decoder_blocks=len(unet.output_blocks), scheduler=schedule_name,
            steps=int(keep_desc.numel() - 1), inversion_steps=int(n_fine),
            extra={"source_prompt": prompt_kind, "inversion_start_sigma": start},
        )
        log.info("%s: inverted %s with %d model evaluations from sigma %.4g (%d stored latents, %.1f MiB); "
                 "source branch prompt: %s", node, tuple(latent.shape), n_fine, start, latents.shape[0],
                 source.nbytes() / 2**20, prompt_kind)
        return io.NodeOutput(source, {"samples": out})


class PlugKitPnPInject(io.ComfyNode):
    """Patches a model so that sampling injects the source's features and self-attention."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitPnPInject",
            display_name="Plug-and-Play Inject (PlugKit)",
            category=CATEGORY,
            description=(
                "While sampling, the source runs in the same batch; its decoder ResBlock features and self-attention "
                "q/k replace the target's during the first steps (Plug-and-Play). Works with ComfyUI's CFG and other patches; "
                "the sampler must run on the inversion's sigmas without added noise (checked: other runs are refused)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The U-Net model to sample with (same family as the one used for inversion)."),
                PnPSourceType.Input("pnp_source", tooltip="From Plug-and-Play Invert."),
                io.Float.Input("feature_injection", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the first sampling steps whose decoder ResBlock features are injected: the first int(steps x share) steps of the source's schedule, counted across split runs (official 0.8). Higher keeps more structure."),
                io.Float.Input("attention_injection", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the first sampling steps whose self-attention q and k are injected: the first int(steps x share) steps of the source's schedule (official 0.5). Higher keeps more layout and appearance."),
                io.String.Input("feature_blocks", default="", optional=True,
                                tooltip="Experts: decoder (output) blocks whose first ResBlock is injected, e.g. '4' or '4, 5'. Empty: family default (SD1.x/2.x: 4, SDXL: 1)."),
                io.String.Input("attention_blocks", default="", optional=True,
                                tooltip="Experts: decoder blocks whose self-attention q/k are injected, e.g. '4-11'. Empty: family default (SD1.x/2.x: 4-11, SDXL: 1-5); 'none' disables."),
                io.Combo.Input("source_mode", options=list(inj.SOURCE_MODES), default=inj.SOURCE_MODES[0], optional=True,
                               tooltip="in-batch: the source runs next to the target in every injected step (no extra memory). cache: the first run keeps the source's injected features and q/k with the PNP_SOURCE; later runs with the same source, schedule and model reuse them and skip the source branch (about plain-sampling speed; SD1.5 at 512 px with the default windows: about 0.7 GB in fp16, on the GPU). cache on CPU: the same, kept in system memory."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with Plug-and-Play injection; sample the inverted LATENT with it.")],
        )

    @classmethod
    def execute(cls, model, pnp_source, feature_injection=0.8, attention_injection=0.5,
                feature_blocks="", attention_blocks="", source_mode=inj.SOURCE_MODES[0]) -> io.NodeOutput:
        node = "PlugKitPnPInject"
        if source_mode not in inj.SOURCE_MODES:
            raise ValueError(f"{node}: input 'source_mode' is {source_mode!r}; use one of {list(inj.SOURCE_MODES)}.")
        if not isinstance(pnp_source, PnPSource):
            raise TypeError(f"{node}: input 'pnp_source' must come from PlugKitPnPInvert (got {type(pnp_source).__name__}).")
        unet = inj.unet_of(model, node)
        pnp_source.check_family(inj.model_family(model), node)
        if len(unet.output_blocks) != pnp_source.decoder_blocks:
            raise ValueError(f"{node}: 'model' has {len(unet.output_blocks)} decoder blocks but the source's model had {pnp_source.decoder_blocks}.")
        for name, v in (("feature_injection", feature_injection), ("attention_injection", attention_injection)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{node}: input '{name}' is {v}; use a share of the steps between 0 and 1.")
        if inj.has_pnp(model):
            raise ValueError(f"{node}: 'model' already comes from a Plug-and-Play Inject node; connect the plain model (one source per model).")
        defaults = inj.family_defaults(unet, node) if not (feature_blocks.strip() and attention_blocks.strip()) else {}
        n = len(unet.output_blocks)
        fblocks = inj.parse_blocks(feature_blocks, n, node, "feature_blocks") if feature_blocks.strip() else defaults["features"]
        ablocks = inj.parse_blocks(attention_blocks, n, node, "attention_blocks") if attention_blocks.strip() else defaults["attention"]
        inj.check_blocks(unet, fblocks, ablocks, node)
        m = model.clone()
        if float(feature_injection) > 0 or float(attention_injection) > 0:
            inj.install(m, pnp_source, float(feature_injection), float(attention_injection), fblocks, ablocks,
                        source_mode)
        return io.NodeOutput(m)


class PlugKitFeatureMap(io.ComfyNode):
    """Renders the first three PCA components of the source's decoder features or self-attention."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitFeatureMap",
            display_name="Plug-and-Play Feature Map (PlugKit)",
            category=CATEGORY,
            description=(
                "Shows what a decoder block sees in the source at a sampling step: the first three PCA components "
                "of its ResBlock features or of its self-attention, as colours. Use it to choose injection blocks."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the source was inverted with (connect the plain model, not the injected one)."),
                PnPSourceType.Input("pnp_source", tooltip="From Plug-and-Play Invert."),
                io.Int.Input("block", default=-1, min=-1, max=11,
                             tooltip="Decoder (output) block. -1: the family's injected feature block (SD1.x/2.x: 4, SDXL: 1)."),
                io.Int.Input("step", default=0, min=0, max=1000,
                             tooltip="Sampling step of the source's schedule (0 = the noisiest, where injection starts). Rendered with the source branch's prompt."),
                io.Combo.Input("kind", options=list(KINDS), default="features",
                               tooltip="features: the block's first ResBlock residual features (what is injected). self-attention: the rows of its first self-attention map (head average)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="PCA components 1-3 as RGB, at the source image's size.")],
        )

    @classmethod
    def execute(cls, model, pnp_source, block=-1, step=0, kind="features") -> io.NodeOutput:
        node = "PlugKitFeatureMap"
        if not isinstance(pnp_source, PnPSource):
            raise TypeError(f"{node}: input 'pnp_source' must come from PlugKitPnPInvert (got {type(pnp_source).__name__}).")
        if kind not in KINDS:
            raise ValueError(f"{node}: input 'kind' is {kind!r}; use one of {list(KINDS)}.")
        unet = inj.unet_of(model, node)
        pnp_source.check_family(inj.model_family(model), node)
        n = len(unet.output_blocks)
        if block < 0:
            block = inj.family_defaults(unet, node)["features"][0]
        if block >= n:
            raise ValueError(f"{node}: input 'block' is {block} but this U-Net's decoder blocks are 0-{n - 1}.")
        traj = pnp_source.trajectory
        last = traj.sigmas.numel() - 2
        if step > last:
            raise ValueError(f"{node}: input 'step' is {step} but the source has steps 0-{last}.")
        if kind == "features":
            inj.check_blocks(unet, (block,), (), node)
        else:
            inj.check_blocks(unet, (), (block,), node)

        m = plain_clone(model)
        if kind == "features":
            key = f"diffusion_model.output_blocks.{block}.0"
            m.add_object_patch(key, inj.FeatureInjectionResBlock(m.get_model_object(key), block))
        else:
            replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
            previous = replaces.get(("output", block, 0), replaces.get(("output", block)))
            if isinstance(previous, inj.AttentionInjection):
                previous = previous.previous
            m.set_model_attn1_replace(inj.AttentionInjection(previous), "output", block, 0)

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
            with inj.call_scope(inj.InjectionCall(n_total=batch, index=None, observe=observe)):
                model_k(x_src.to(x), s_in * sigma, **(extra_args or {}))
            return x

        run_custom_sampler(m, pnp_source.conditioning, torch.zeros(traj.shape),
                           torch.tensor([sigma, 0.0]), probe_fn)
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
        image = torch.stack(images)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))

NODES = [PlugKitPnPInvert, PlugKitPnPInject, PlugKitFeatureMap]
