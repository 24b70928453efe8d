"""Plug-and-Play nodes: PlugKitPnPInvert, PlugKitPnPInject, PlugKitFeatureMap.

Technique: Tumanyan, Geyer, Bagon, Dekel, "Plug-and-Play Diffusion Features for Text-Driven
Image-to-Image Translation" (CVPR 2023); official code MichalGeyer/pnp-diffusers (MIT). This pack's
code is written from the paper and that code, not copied. The math lives in ``ddim_inversion``,
``feature_pca`` and ``schedule``; the U-Net hooks in ``hooks`` (decoder blocks: ``blocks``; source
cache: ``source_cache``); the model runs in ``runs``; this file is glue.
"""
from __future__ import annotations

import torch

import comfy.samplers

from ..comfy_io import io, ui
from ..node_errors import check_choice, input_error
from . import hooks, runs
from .blocks import feature_map_block, injected_blocks, model_family, unet_of
from .ddim_inversion import OFFICIAL_INVERSION_STEPS
from .pnp_source import PnPSource

CATEGORY = "PlugKit/Plug-and-Play"
PnPSourceType = io.Custom("PLUGKIT_PNP_SOURCE")
DEFAULT_INVERSION_STEPS = 50  # = steps: see the reconstruction table in docs/pnp.md
RESOLUTIONS = ("inversion_steps", "official 999")
MAX_FIXED_POINT_ITERATIONS = 10
KINDS = ("features", "self-attention")


def check_invert_inputs(conditioning, source_prompt, latent: torch.Tensor, node: str) -> None:
    """PlugKitPnPInvert's prompts and source latent, or a clear error."""
    if not conditioning:
        raise input_error(node, "conditioning", "is empty", "connect a CLIP Text Encode (empty text is the official choice)")
    if source_prompt is not None and not source_prompt:
        raise input_error(node, "source_prompt", "is empty", "connect a CLIP Text Encode with an empty text, or leave it unconnected")
    if latent.is_nested or latent.dim() != 4:
        raise input_error(node, "samples", f"must be an image latent (batch, channels, height, width); got {tuple(latent.shape)}")
    if latent.shape[-1] < 16 or latent.shape[-2] < 16:
        raise input_error(node, "samples", f"is {latent.shape[-1]}x{latent.shape[-2]} (latent)", "use an image of at least 128x128 px")
    if not bool(torch.isfinite(latent).all()):
        raise input_error(node, "samples", "contains NaN or infinite values", "re-encode the source image")


def check_source(model, pnp_source, node: str):
    """The model's U-Net, after checking that ``pnp_source`` is a PnP source of the model's family."""
    if not isinstance(pnp_source, PnPSource):
        raise TypeError(f"{node}: input 'pnp_source' must come from PlugKitPnPInvert (got {type(pnp_source).__name__}).")
    unet = unet_of(model, node)
    pnp_source.check_family(model_family(model), node)
    return unet


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
                io.Int.Input("fixed_point_iterations", default=0, min=0, max=MAX_FIXED_POINT_ITERATIONS, optional=True,
                             tooltip="Faster faithful inversion (not in the official code): refine each inversion step this many times so that a DDIM sampling step takes it back exactly; each iteration costs one more model evaluation per step. 0 = the official step. 1 with inversion_steps = steps (100 evaluations for 50 steps) reconstructs the source about as well as 'official 999' or better (measured in docs/pnp.md)."),
            ],
            outputs=[
                PnPSourceType.Output(display_name="PNP_SOURCE", tooltip="The inverted source trajectory and its conditioning, for Plug-and-Play Inject and Feature Map."),
                io.Latent.Output(display_name="LATENT", tooltip="The inverted latent at the first sampling step: sample it with add_noise disabled."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, conditioning, steps=50, inversion_steps=DEFAULT_INVERSION_STEPS,
                scheduler="ddim_uniform", inversion_resolution=RESOLUTIONS[0], source_prompt=None,
                sigmas=None, fixed_point_iterations=0) -> io.NodeOutput:
        node = "PlugKitPnPInvert"
        unet_of(model, node)
        check_choice(scheduler, comfy.samplers.SCHEDULER_NAMES, node, "scheduler")
        check_choice(inversion_resolution, RESOLUTIONS, node, "inversion_resolution")
        latent = samples["samples"]
        check_invert_inputs(conditioning, source_prompt, latent, node)
        keep_desc, schedule_name = runs.sampling_schedule(model, steps, scheduler, sigmas, node)
        n_inv = OFFICIAL_INVERSION_STEPS if inversion_resolution == "official 999" else int(inversion_steps)
        if n_inv < 1:
            raise input_error(node, "inversion_steps", f"is {inversion_steps}", "use at least 1")
        if not 0 <= int(fixed_point_iterations) <= MAX_FIXED_POINT_ITERATIONS:
            raise input_error(node, "fixed_point_iterations", f"is {fixed_point_iterations}",
                              f"use 0-{MAX_FIXED_POINT_ITERATIONS} (0 = the official step)")
        source, out = runs.invert_source(model, latent, conditioning, keep_desc, schedule_name, n_inv, source_prompt, node,
                                         fixed_point_iterations=int(fixed_point_iterations))
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
                io.Combo.Input("source_mode", options=list(hooks.SOURCE_MODES), default=hooks.SOURCE_MODES[0], optional=True,
                               tooltip="in-batch: the source runs next to the target in every injected step (no extra memory). cache: the first run keeps the source's injected features and q/k with the PNP_SOURCE; later runs with the same source, schedule and model reuse them and skip the source branch (about plain-sampling speed; SD1.5 at 512 px with the default windows: about 0.7 GB in fp16, on the GPU). cache on CPU: the same, kept in system memory."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with Plug-and-Play injection; sample the inverted LATENT with it.")],
        )

    @classmethod
    def execute(cls, model, pnp_source, feature_injection=0.8, attention_injection=0.5,
                feature_blocks="", attention_blocks="", source_mode=hooks.SOURCE_MODES[0]) -> io.NodeOutput:
        node = "PlugKitPnPInject"
        check_choice(source_mode, hooks.SOURCE_MODES, node, "source_mode")
        unet = check_source(model, pnp_source, node)
        if len(unet.output_blocks) != pnp_source.decoder_blocks:
            raise ValueError(f"{node}: 'model' has {len(unet.output_blocks)} decoder blocks but the source's model had {pnp_source.decoder_blocks}.")
        for name, v in (("feature_injection", feature_injection), ("attention_injection", attention_injection)):
            if not 0.0 <= float(v) <= 1.0:
                raise input_error(node, name, f"is {v}", "use a share of the steps between 0 and 1")
        if hooks.has_pnp(model):
            raise ValueError(f"{node}: 'model' already comes from a Plug-and-Play Inject node; connect the plain model (one source per model).")
        fblocks, ablocks = injected_blocks(unet, feature_blocks, attention_blocks, node)
        m = model.clone()
        if float(feature_injection) > 0 or float(attention_injection) > 0:
            hooks.install(m, pnp_source, float(feature_injection), float(attention_injection), fblocks, ablocks,
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
        check_choice(kind, KINDS, node, "kind")
        unet = check_source(model, pnp_source, node)
        block = feature_map_block(unet, block, kind, node)
        last = pnp_source.trajectory.sigmas.numel() - 2
        if step > last:
            raise input_error(node, "step", f"is {step} but the source has steps 0-{last}")
        image = runs.feature_map(model, pnp_source, block, step, kind, node)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [PlugKitPnPInvert, PlugKitPnPInject, PlugKitFeatureMap]
