"""Diff-Plugin nodes: load Task-Plugins, apply one, select plugins from an instruction, run a chain.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks", CVPR 2024
(https://arxiv.org/abs/2403.00644); official code yuhaoliu7456/Diff-Plugin. The released plugin
weights are CC BY-NC-SA 4.0 (non-commercial). The math lives in task_plugin.py / plugin_selector.py.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from ..comfy_io import io, ui
from . import official_resize, official_unipc, plugin_files
from .official_resize import RESIZE_INFER, RESIZE_RULES
from .plugin_selector import RULE_OFFICIAL, RULES, select_plugins

log = logging.getLogger(__name__)

FOLDER = "diff_plugin"
CATEGORY = "PlugKit/Diff-Plugin"
TaskPluginType = io.Custom("PLUGKIT_TASK_PLUGIN")
TaskPluginListType = io.Custom("PLUGKIT_TASK_PLUGIN_LIST")
MAX_CANDIDATES = 8
OFFICIAL_SAMPLER = "official"
SAMPLERS = (OFFICIAL_SAMPLER, "uni_pc_bh2", "uni_pc", "euler", "dpmpp_2m", "ddim")
START_OFFICIAL = "official (per task)"
START_NOISE = "noise"
START_IMAGE = "image"
STARTS = (START_OFFICIAL, START_NOISE, START_IMAGE)
SAMPLER_STARTS = (START_IMAGE, START_NOISE)
CFG_WRAPPER_KEY = "plugkit_diff_plugin_cfg"
RESIZE_TOOLTIP = ("How the image is sized for the VAE / SCB (the CLIP input is always the original image, as in the "
                  "official scripts). infer.py (official default): a short side under 512 px is upscaled to 512, then "
                  "both sides are resized (not cropped) down to multiples of 8; larger images keep their size. "
                  "demo.py: the short side is always set to 512 (large photos are scaled down), then multiples of 8. "
                  "none: the image as given (ComfyUI's VAE crops it to multiples of 8). The output has the resized size.")
START_TOOLTIP = ("The start latent. official (per task): pure noise for the lowlight and highlight plugins (a released "
                 "folder named so, or a .safetensors plugin saved with start 'noise'), the image otherwise, as infer.py's "
                 "--inp_of_unet_is_random_noise and demo.py. noise: always pure noise. image: always the image's latent "
                 "(noised by the sampler).")
SCHEDULERS = ("normal", "simple", "sgm_uniform", "karras")


# --- models/diff_plugin -------------------------------------------------------------------------

def plugin_folders() -> list[str]:
    """Register ``models/diff_plugin`` with folder_paths (idempotent; called lazily, never at import)
    and return every folder configured for it (extra_model_paths.yaml entries included)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    return folder_paths.get_folder_paths(FOLDER)


def scan_folder() -> tuple[list[str], list[str]]:
    """(plugin names, selector names) under every diff_plugin folder, as relative posix paths (a bounded
    scan that never goes round a link loop: plugin_files.scan_plugin_folders)."""
    scan = plugin_files.scan_plugin_folders(plugin_folders())
    return scan.plugins, scan.selectors


def resolve(name: str, node: str, what: str) -> Path:
    """The plugin or selector ``name`` as the folder scan lists it. Any other name (missing, absolute, with
    '..', not a plugin) gets the same error, so a prompt can neither load nor probe other files."""
    path = plugin_files.resolve_name(name, plugin_folders(), what)
    if path is not None:
        return path
    raise ValueError(
        f"{node}: input '{what}_name': {what} {name!r} not found under models/{FOLDER} ({', '.join(plugin_folders())}). "
        "Put the released plugin folders (e.g. derain/ with scb/ and tpb.pt) or .safetensors plugins there, "
        "refresh (R) and pick one from the list."
    )


def _options(kind: int) -> list[str]:
    try:
        found = scan_folder()[kind]
    except Exception as exc:  # listing must never break the node list
        log.warning("Diff-Plugin: could not list models/%s: %s", FOLDER, exc)
        found = []
    return found


# --- applying a plugin --------------------------------------------------------------------------

def clip_hidden_states(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """CLIP ViT-L/14 last-layer hidden states (before the post-layernorm) of the 224 centre crop."""
    return clip_vision.encode_image(image, crop=True)["last_hidden_state"].float()


def encode_task_prompt(handle, clip_vision, image: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Fp [B, 256, 768] for the image: CLIP vision hidden states (computed here unless given) through the TPB."""
    import comfy.model_management

    if hidden is None:
        hidden = clip_hidden_states(clip_vision, image)
    with torch.no_grad():
        fp = handle.plugin.task_prompt(hidden)
    return fp.to(comfy.model_management.intermediate_device(), torch.float32)


def check_choice(node: str, name: str, value: str, options) -> str:
    """ComfyUI 0.3.75 does not validate V3 combo values: do it here, with the fix in the message."""
    if value not in options:
        raise ValueError(f"{node}: input '{name}' is {value!r}; use one of {list(options)}.")
    return value


def starts_from_noise(handle, start: str, node: str) -> bool:
    check_choice(node, "start", start, STARTS)
    if start == START_OFFICIAL:
        return handle.plugin.start_from_noise
    return start == START_NOISE


def warn_if_guided(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper of a model with a Task-Plugin applied: Diff-Plugin samples without guidance.
    A stateless check of the guider's cfg, once per sampling run."""
    guider = executor.class_obj
    cfgs = [getattr(guider, name) for name in ("cfg", "cfg1", "cfg2") if isinstance(getattr(guider, name, None), (int, float))]
    off = [c for c in cfgs if abs(float(c) - 1.0) > 1e-6]
    if off:
        log.warning(
            "PlugKitApplyTaskPlugin: this model carries a Diff-Plugin Task-Plugin and is sampled with cfg %s. "
            "Task-Plugins are sampled without guidance: set cfg to 1.0 in the sampler (KSampler's default 8.0 "
            "washes the result out and mixes in the 'negative' conditioning, which has no plugin). For the exact "
            "official sampler use Run Diff-Plugin Chain, or SamplerCustom with the Diff-Plugin sampler and sigmas.",
            ", ".join(f"{float(c):g}" for c in off))
    return executor(*args, **kwargs)


def apply_task_plugin(model, handle, clip_vision, vae, image: torch.Tensor, strength: float = 1.0,
                      node: str = "PlugKitApplyTaskPlugin", start: str = START_OFFICIAL, resize: str = RESIZE_INFER,
                      fp: torch.Tensor | None = None):
    """(model clone, CONDITIONING with Fp and the SCB control, LATENT start). Never mutates ``model``.
    Fp comes from the original ``image`` (or is given, as the chain does); the VAE/SCB input is the image
    resized by ``resize`` (official_resize)."""
    import comfy.patcher_extension

    from .hooks import TaskPluginControl, check_sd1_model

    if image is None or image.ndim != 4:
        raise ValueError(f"{node}: input 'image' must be an IMAGE batch [B, H, W, C].")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise ValueError(f"{node}: input 'image' is {image.shape[2]}x{image.shape[1]} px; it must be at least 8x8.")
    check_choice(node, "resize", resize, RESIZE_RULES)
    from_noise = starts_from_noise(handle, start, node)
    check_sd1_model(model, node, handle.plugin.scb.channels)
    if fp is None:
        fp = encode_task_prompt(handle, clip_vision, image)
    pixels = official_resize.resize_image(image, resize)
    latent = vae.encode(pixels[:, :, :, :3])
    cond_latent = model.get_model_object("latent_format").process_in(latent)
    control = TaskPluginControl(handle, cond_latent, strength)
    conditioning = [[fp, {"control": control, "control_apply_to_uncond": False}]]
    start_latent = torch.zeros_like(latent) if from_noise else latent
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CFG_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CFG_WRAPPER_KEY, warn_if_guided)
    return m, conditioning, {"samples": start_latent}


def run_plugin_chain(model, handles, clip_vision, vae, image, *, seed: int = 42, steps: int = 20,
                     later_steps: int = 3, sampler_name: str = OFFICIAL_SAMPLER, scheduler: str = "normal",
                     start: str = START_OFFICIAL, resize: str = RESIZE_INFER,
                     node: str = "PlugKitRunPluginChain") -> torch.Tensor:
    """demo.py's multi-plugin schedule: every plugin's Fp computed once from the ORIGINAL image; the image
    resized once (``resize``); the first plugin runs ``steps``, each later one ``later_steps`` on the
    previous result (8-bit, as demo.py's PIL round trip), each with the same seed's noise; cfg 1 (no
    guidance). Returns the final IMAGE."""
    import comfy.sample
    import comfy.utils

    check_choice(node, "resize", resize, RESIZE_RULES)
    for handle in handles:
        starts_from_noise(handle, start, node)  # a bad 'start' fails before any work
    hidden = clip_hidden_states(clip_vision, image)  # one CLIP pass of the original serves every plugin's TPB
    prompts = [encode_task_prompt(h, clip_vision, image, hidden) for h in handles]
    current = official_resize.resize_image(image, resize)
    total = sum(steps if i == 0 else later_steps for i in range(len(handles)))
    bar = comfy.utils.ProgressBar(max(total, 1))
    for index, (handle, fp) in enumerate(zip(handles, prompts)):
        if index > 0:
            current = official_resize.quantize_8bit(current)
        m, positive, latent = apply_task_plugin(model, handle, clip_vision, vae, current, node=node, start=start,
                                                resize=official_resize.RESIZE_NONE, fp=fp)
        samples = latent["samples"]
        noise = comfy.sample.prepare_noise(samples, seed, None)
        n = steps if index == 0 else later_steps
        if sampler_name == OFFICIAL_SAMPLER:
            samples = sample_official(m, positive, latent, noise, n, starts_from_noise(handle, start, node),
                                      callback=lambda *_: bar.update(1))
        else:
            samples = comfy.sample.sample(
                m, noise, n, 1.0, sampler_name, scheduler, positive, [], samples, denoise=1.0, seed=seed,
                callback=lambda step, x0, x, total_steps: bar.update(1), disable_pbar=True,
            )
        current = vae.decode(samples)
        if current.ndim == 5:
            current = current.reshape(-1, *current.shape[-3:])
        log.info("Diff-Plugin chain: applied %s (%d steps)", handle.name, n)
    return current


# --- the official sampler as ComfyUI objects ------------------------------------------------------

def official_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, start: str = START_IMAGE):
    """``KSAMPLER`` function of the official sampler. ComfyUI's KSAMPLER hands the sampler its model
    wrapper with the clean ``latent_image`` (process_in'd) and the unscaled ``noise``; from them this
    builds infer.py's first latent itself (ComfyUI's own start is latent + sqrt(1 + sigma^2) * noise):
    ``image``: latent + sigma * noise, re-noised the same way at every t >= 960; ``noise``: unit-variance
    noise (sqrt(1 + sigma^2) * noise here), never re-noised. Returns infer.py's final latent (alpha_0 x)."""
    model_sampling = model.inner_model.inner_model.model_sampling
    noise = getattr(model, "noise", None)
    latent = getattr(model, "latent_image", None)
    if noise is None or latent is None:
        raise ValueError("PlugKitDiffPluginSampler: the sampler got no latent/noise from ComfyUI; use it in SamplerCustom "
                         "or a core sampler node.")
    sigma0 = float(sigmas[0])
    if start == START_NOISE:
        x = noise * math.sqrt(1.0 + sigma0 * sigma0)
        renoise: list[bool] = []
    else:
        timesteps = [int(t) for t in model_sampling.timestep(sigmas[:-1]).reshape(-1).tolist()]
        renoise = official_unipc.renoise_flags(timesteps)
        x = latent + noise * sigma0
    out = official_unipc.sample_official_unipc(model, x, sigmas, extra_args=extra_args, callback=callback,
                                               disable=disable, renoise=renoise, renoise_latent=latent,
                                               renoise_noise=noise)
    return official_unipc.official_finish(out, float(sigmas[-1]))


def official_sampler(start: str = START_IMAGE):
    import comfy.samplers

    return comfy.samplers.KSAMPLER(official_sampler_function, extra_options={"start": start})


def official_model_sigmas(model, steps: int) -> torch.Tensor:
    return official_unipc.official_sigmas(model.get_model_object("model_sampling").sigma, steps)


def sample_official(m, positive, latent: dict, noise: torch.Tensor, steps: int, from_noise: bool,
                    callback=None) -> torch.Tensor:
    """infer.py's sampling, exactly: its first latent, diffusers' UniPC on its timestep grid (re-noised at
    every t >= 960), its final latent (returned as KSampler's, process_out'd)."""
    import comfy.sample

    sampler = official_sampler(START_NOISE if from_noise else START_IMAGE)
    return comfy.sample.sample_custom(m, noise, 1.0, sampler, official_model_sigmas(m, steps), positive, [],
                                      latent["samples"], callback=callback, disable_pbar=True)


def path_fingerprint(path: Path) -> tuple:
    """(name, size, mtime_ns, inode) of a file, or of every file below a folder: changes when a plugin is
    rewritten under the same name (training saves atomically: a new file)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append((f.as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def name_fingerprint(name: str, node: str, what: str):
    try:
        return path_fingerprint(resolve(name, node, what))
    except (OSError, ValueError):
        return ("missing", name)  # execute() reports the error


# --- nodes ----------------------------------------------------------------------------------------

class PlugKitTaskPluginLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitTaskPluginLoader",
            display_name="Load Diff-Plugin Task-Plugin",
            category=CATEGORY,
            description="Loads a Diff-Plugin Task-Plugin (TPB + SCB) from models/diff_plugin: a released folder "
                        "(scb/ + tpb.pt) or a PlugKit .safetensors plugin.",
            inputs=[
                io.Combo.Input("plugin_name", options=_options(0),
                               tooltip="A plugin under models/diff_plugin: a released task folder such as 'derain' "
                                       "(holding scb/ and tpb.pt) or a .safetensors plugin."),
            ],
            outputs=[TaskPluginType.Output(display_name="plugin")],
        )

    @classmethod
    def fingerprint_inputs(cls, plugin_name: str):
        """ComfyUI re-runs the loader when this changes: a plugin retrained under the same name is reloaded."""
        return name_fingerprint(plugin_name, "PlugKitTaskPluginLoader", "plugin")

    @classmethod
    def execute(cls, plugin_name: str) -> io.NodeOutput:
        from .hooks import PluginHandle

        path = resolve(plugin_name, "PlugKitTaskPluginLoader", "plugin")
        name = Path(plugin_name).stem if path.is_file() else path.name
        try:
            plugin = plugin_files.load_plugin(path, name=name)
        except plugin_files.PluginFileError as exc:
            raise ValueError(f"PlugKitTaskPluginLoader: input 'plugin_name': {exc}") from exc
        return io.NodeOutput(PluginHandle(plugin, source=str(path)))


class PlugKitApplyTaskPlugin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitApplyTaskPlugin",
            display_name="Apply Diff-Plugin Task-Plugin",
            category=CATEGORY,
            description="Turns a degraded image into the conditioning of a Task-Plugin: Fp (TPB output) as the "
                        "context and the SCB attached as a control. Sample with cfg 1.0 (a sampler with another cfg "
                        "logs a warning); for the exact official sampler use SamplerCustom with the Diff-Plugin "
                        "sampler and sigmas, or Run Diff-Plugin Chain.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x model (Diff-Plugin was trained on SD 1.4). Returned cloned, unchanged."),
                TaskPluginType.Input("plugin", tooltip="The Task-Plugin from 'Load Diff-Plugin Task-Plugin'."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model (core 'Load CLIP Vision'), "
                                                           "e.g. clip_vision_vit_l_14 / openai clip-vit-large-patch14."),
                io.Vae.Input("vae", tooltip="The SD 1.x VAE; encodes the degraded image for the SCB and the start latent."),
                io.Image.Input("image", tooltip="The degraded image (any size: 'resize' sizes it as the official scripts do)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                               tooltip="Scale of the SCB residuals (1.0 = the official pipeline)."),
                io.Combo.Input("start", options=list(STARTS), default=START_OFFICIAL, optional=True, tooltip=START_TOOLTIP),
                io.Combo.Input("resize", options=list(RESIZE_RULES), default=RESIZE_INFER, optional=True,
                               tooltip=RESIZE_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive"),
                io.Latent.Output(display_name="latent"),
            ],
        )

    @classmethod
    def execute(cls, model, plugin, clip_vision, vae, image, strength: float = 1.0, start: str = START_OFFICIAL,
                resize: str = RESIZE_INFER) -> io.NodeOutput:
        m, positive, latent = apply_task_plugin(model, plugin, clip_vision, vae, image, strength, start=start, resize=resize)
        return io.NodeOutput(m, positive, latent)


def _candidate_inputs() -> list:
    return [TaskPluginType.Input(f"plugin_{i}", optional=True,
                                 tooltip=f"Candidate Task-Plugin {i} (order = the order selected plugins run in).")
            for i in range(1, MAX_CANDIDATES + 1)]


class PlugKitPluginSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitPluginSelector",
            display_name="Diff-Plugin Plugin-Selector",
            category=CATEGORY,
            description="Scores candidate Task-Plugins against an instruction with the released Plugin-Selector "
                        "and returns the selected plugins, in order, plus every score.",
            inputs=[
                io.Clip.Input("clip", tooltip="The SD 1.x text encoder (from the checkpoint loader)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model (core 'Load CLIP Vision')."),
                io.Image.Input("image", tooltip="The degraded image (the first image of a batch is scored)."),
                io.String.Input("instruction", default="remove the rain", multiline=True,
                                tooltip="What to do, in words, e.g. 'remove rain and haze'."),
                io.Combo.Input("selector_name", options=_options(1),
                               tooltip="Selector weights under models/diff_plugin, e.g. plugin_selector/PromptTunner.pt."),
                io.Combo.Input("rule", options=list(RULES), default=RULE_OFFICIAL, optional=True,
                               tooltip="Official: every plugin scoring above 0 (the demo's rule). 'above null': "
                                       "plugins scoring above the empty-instruction slot."),
                *_candidate_inputs(),
            ],
            outputs=[
                TaskPluginListType.Output(display_name="plugins"),
                io.String.Output(display_name="report"),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, selector_name: str = "", **_):
        """Re-run when the selector file is replaced under the same name (the other inputs are compared by ComfyUI)."""
        return name_fingerprint(selector_name, "PlugKitPluginSelector", "selector")

    @classmethod
    def execute(cls, clip, clip_vision, image, instruction: str, selector_name: str, rule: str = RULE_OFFICIAL,
                **candidates) -> io.NodeOutput:
        node = "PlugKitPluginSelector"
        if rule not in RULES:
            raise ValueError(f"{node}: input 'rule' is {rule!r}; use one of {list(RULES)}.")
        handles = [candidates[f"plugin_{i}"] for i in range(1, MAX_CANDIDATES + 1)
                   if candidates.get(f"plugin_{i}") is not None]
        if not handles:
            raise ValueError(f"{node}: connect at least one Task-Plugin to plugin_1 ... plugin_{MAX_CANDIDATES}.")
        try:
            tuner = plugin_files.load_selector(resolve(selector_name, node, "selector"))
        except plugin_files.PluginFileError as exc:
            raise ValueError(f"{node}: input 'selector_name': {exc}") from exc
        text = pooled_text(clip, instruction)
        null = pooled_text(clip, " ")
        hidden = clip_hidden_states(clip_vision, image[:1])  # one CLIP pass serves every candidate's TPB
        prompts = [encode_task_prompt(h, clip_vision, image[:1], hidden)[0] for h in handles]
        selection = select_plugins(tuner, text, null, prompts, [h.name for h in handles], rule)
        chosen = [handles[i] for i in selection.selected]
        report = selection.report()
        log.info("Diff-Plugin selector: %s", report.replace("\n", "; "))
        return io.NodeOutput(chosen, report, ui=ui.PreviewText(report))


def pooled_text(clip, text: str) -> torch.Tensor:
    """The unprojected pooled embedding (final-layer-normed EOS token), as HF CLIPTextModel's pooler_output."""
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled="unprojected", return_dict=True)
    pooled = out.get("pooled_output")
    if pooled is None:
        raise ValueError("PlugKitPluginSelector: input 'clip' gives no pooled text embedding; use an SD 1.x CLIP.")
    return pooled[:1].float()


class PlugKitRunPluginChain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitRunPluginChain",
            display_name="Run Diff-Plugin Chain",
            category=CATEGORY,
            description="Applies the selected Task-Plugins in order as the official demo.py does: every plugin's "
                        "task prompt from the original image, the first plugin full steps, each later one a few steps "
                        "on the previous result (cfg 1).",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x model."),
                TaskPluginListType.Input("plugins", optional=True,
                                         tooltip="Selected plugins from 'Diff-Plugin Plugin-Selector', run in order."),
                TaskPluginType.Input("plugin", optional=True,
                                     tooltip="Or one Task-Plugin from 'Load Diff-Plugin Task-Plugin' (run after 'plugins' "
                                             "when both are connected): the official result of a single plugin."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model."),
                io.Vae.Input("vae", tooltip="The SD 1.x VAE."),
                io.Image.Input("image", tooltip="The degraded image."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (the official demo uses 42)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Steps of the first plugin (official: 20)."),
                io.Int.Input("later_steps", default=3, min=1, max=200, tooltip="Steps of each later plugin (official: 3)."),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default=OFFICIAL_SAMPLER,
                               tooltip="official: the official pipeline's sampling exactly (diffusers' UniPC, bh2, order 2, "
                                       "on t = 999, 949, ..., with its start and final latent; 'scheduler' is not used). "
                                       "The others are ComfyUI's samplers with 'scheduler': close to the official "
                                       "result, not identical (ComfyUI's uni_pc_bh2 is order 3 on its own grid)."),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="normal",
                               tooltip="Sigma schedule of ComfyUI's samplers (the official sampler has its own)."),
                io.Combo.Input("start", options=list(STARTS), default=START_OFFICIAL, optional=True,
                               tooltip=START_TOOLTIP + " Chosen per plugin of the chain."),
                io.Combo.Input("resize", options=list(RESIZE_RULES), default=RESIZE_INFER, optional=True,
                               tooltip=RESIZE_TOOLTIP + " Applied once, before the first plugin (demo.py's chain)."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, image, plugins=None, plugin=None, seed: int = 42, steps: int = 20,
                later_steps: int = 3, sampler_name: str = OFFICIAL_SAMPLER, scheduler: str = "normal",
                start: str = START_OFFICIAL, resize: str = RESIZE_INFER) -> io.NodeOutput:
        if plugins is None and plugin is None:
            raise ValueError("PlugKitRunPluginChain: connect 'plugins' (from the Plugin-Selector) or 'plugin' "
                             "(from 'Load Diff-Plugin Task-Plugin').")
        if sampler_name not in SAMPLERS:
            raise ValueError(f"PlugKitRunPluginChain: input 'sampler_name' is {sampler_name!r}; use one of {list(SAMPLERS)}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"PlugKitRunPluginChain: input 'scheduler' is {scheduler!r}; use one of {list(SCHEDULERS)}.")
        chain = list(plugins or []) + ([plugin] if plugin is not None else [])
        if not chain:
            log.info("Diff-Plugin chain: no plugin selected; returning the input image")
            return io.NodeOutput(image)
        out = run_plugin_chain(model, chain, clip_vision, vae, image, seed=seed, steps=steps,
                               later_steps=later_steps, sampler_name=sampler_name, scheduler=scheduler,
                               start=start, resize=resize)
        return io.NodeOutput(out)


class PlugKitDiffPluginSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitDiffPluginSampler",
            display_name="Diff-Plugin Official Sampler",
            category=CATEGORY,
            description="The official Diff-Plugin sampler (diffusers' UniPC as infer.py runs it: bh2, order 2, "
                        "with its start latent and its re-noising at every t >= 960) as a SAMPLER for SamplerCustom. "
                        "Use it with 'Diff-Plugin Official Sigmas', cfg 1.0, add_noise on, and Apply Task-Plugin's "
                        "model, positive and latent.",
            inputs=[
                io.Combo.Input("start", options=list(SAMPLER_STARTS), default=START_IMAGE,
                               tooltip="image: infer.py's default, the latent (Apply Task-Plugin's image latent) noised "
                                       "to each step with t >= 960. noise: pure noise (lowlight / highlight, infer.py's "
                                       "--inp_of_unet_is_random_noise); the latent is not used."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler")],
        )

    @classmethod
    def execute(cls, start: str = START_IMAGE) -> io.NodeOutput:
        check_choice("PlugKitDiffPluginSampler", "start", start, SAMPLER_STARTS)
        return io.NodeOutput(official_sampler(start))


class PlugKitDiffPluginSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitDiffPluginSigmas",
            display_name="Diff-Plugin Official Sigmas",
            category=CATEGORY,
            description="The official timesteps (diffusers' UniPC linspace grid: 20 steps = t 999, 949, ..., 50, "
                        "ending at t = 0) as SIGMAS for SamplerCustom with the Diff-Plugin sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The SD 1.x model (its noise schedule gives the sigmas)."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Number of steps (official: 20)."),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, model, steps: int = 20) -> io.NodeOutput:
        if steps < 1:
            raise ValueError("PlugKitDiffPluginSigmas: input 'steps' must be at least 1.")
        model_sampling = model.get_model_object("model_sampling")
        if not hasattr(model_sampling, "log_sigmas"):
            raise ValueError("PlugKitDiffPluginSigmas: input 'model' has no discrete noise schedule; use an SD 1.x model.")
        return io.NodeOutput(official_model_sigmas(model, steps))


from .runs import PlugKitTrainTaskPlugin  # noqa: E402

NODES = [PlugKitTaskPluginLoader, PlugKitApplyTaskPlugin, PlugKitPluginSelector, PlugKitRunPluginChain,
         PlugKitDiffPluginSampler, PlugKitDiffPluginSigmas, PlugKitTrainTaskPlugin]
