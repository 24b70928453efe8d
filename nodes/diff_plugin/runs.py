"""Diff-Plugin's model runs, as the nodes and the command line drive them: a Task-Plugin applied to a
model (Fp, the SCB control, the start latent), the official sampler as ComfyUI objects, demo.py's plugin
chain, the Plugin-Selector's scores, and plugin training on a folder of pairs (``train_from_folder``,
shared by PlugKitTrainTaskPlugin and ``train_cli.py``). The math is in task_plugin.py, plugin_selector.py,
official_unipc.py and plugin_training.py; what ComfyUI calls while sampling is in hooks.py."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..node_errors import check_choice
from . import hooks, model_folders, official_resize, official_unipc, plugin_files
from . import plugin_training as pt
from .official_resize import RESIZE_INFER, RESIZE_RULES
from .plugin_selector import select_plugins
from .task_plugin import TaskPlugin

log = logging.getLogger(__name__)

OFFICIAL_SAMPLER = "official"
SAMPLERS = (OFFICIAL_SAMPLER, "uni_pc_bh2", "uni_pc", "euler", "dpmpp_2m", "ddim")
START_OFFICIAL = "official (per task)"
START_NOISE = "noise"
START_IMAGE = "image"
STARTS = (START_OFFICIAL, START_NOISE, START_IMAGE)
SAMPLER_STARTS = (START_IMAGE, START_NOISE)


# --- loading and applying a plugin ----------------------------------------------------------------

def load_task_plugin(plugin_name: str, node: str) -> hooks.PluginHandle:
    """The plugin listed as ``plugin_name`` under models/diff_plugin, loaded into a PluginHandle."""
    path = model_folders.resolve(plugin_name, node, "plugin")
    name = Path(plugin_name).stem if path.is_file() else path.name
    try:
        plugin = plugin_files.load_plugin(path, name=name)
    except plugin_files.PluginFileError as exc:
        raise ValueError(f"{node}: input 'plugin_name': {exc}") from exc
    return hooks.PluginHandle(plugin, source=str(path))


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


def starts_from_noise(handle, start: str, node: str) -> bool:
    check_choice(start, STARTS, node, "start")
    if start == START_OFFICIAL:
        return handle.plugin.start_from_noise
    return start == START_NOISE


def apply_task_plugin(model, handle, clip_vision, vae, image: torch.Tensor, strength: float = 1.0,
                      node: str = "PlugKitApplyTaskPlugin", start: str = START_OFFICIAL, resize: str = RESIZE_INFER,
                      fp: torch.Tensor | None = None):
    """(model clone, CONDITIONING with Fp and the SCB control, LATENT start). Never mutates ``model``.
    Fp comes from the original ``image`` (or is given, as the chain does); the VAE/SCB input is the image
    resized by ``resize`` (official_resize)."""
    import comfy.patcher_extension

    if image is None or image.ndim != 4:
        raise ValueError(f"{node}: input 'image' must be an IMAGE batch [B, H, W, C].")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise ValueError(f"{node}: input 'image' is {image.shape[2]}x{image.shape[1]} px; it must be at least 8x8.")
    check_choice(resize, RESIZE_RULES, node, "resize")
    from_noise = starts_from_noise(handle, start, node)
    hooks.check_sd1_model(model, node, handle.plugin.scb.channels)
    if fp is None:
        fp = encode_task_prompt(handle, clip_vision, image)
    pixels = official_resize.resize_image(image, resize)
    latent = vae.encode(pixels[:, :, :, :3])
    cond_latent = model.get_model_object("latent_format").process_in(latent)
    control = hooks.TaskPluginControl(handle, cond_latent, strength)
    conditioning = [[fp, {"control": control, "control_apply_to_uncond": False}]]
    start_latent = torch.zeros_like(latent) if from_noise else latent
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, hooks.CFG_WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, hooks.CFG_WRAPPER_KEY, hooks.warn_if_guided)
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

    check_choice(resize, RESIZE_RULES, node, "resize")
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


# --- the Plugin-Selector ---------------------------------------------------------------------------

def pooled_text(clip, text: str) -> torch.Tensor:
    """The unprojected pooled embedding (final-layer-normed EOS token), as HF CLIPTextModel's pooler_output."""
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled="unprojected", return_dict=True)
    pooled = out.get("pooled_output")
    if pooled is None:
        raise ValueError("PlugKitPluginSelector: input 'clip' gives no pooled text embedding; use an SD 1.x CLIP.")
    return pooled[:1].float()


def select_for_instruction(clip, clip_vision, image, instruction: str, selector_name: str, rule: str, handles,
                           node: str = "PlugKitPluginSelector"):
    """(the selected handles in order, the text report): the released selector scores every candidate's
    Fp (from the first image) against the instruction's pooled text embedding and the empty one's."""
    try:
        tuner = plugin_files.load_selector(model_folders.resolve(selector_name, node, "selector"))
    except plugin_files.PluginFileError as exc:
        raise ValueError(f"{node}: input 'selector_name': {exc}") from exc
    text = pooled_text(clip, instruction)
    null = pooled_text(clip, " ")
    hidden = clip_hidden_states(clip_vision, image[:1])  # one CLIP pass serves every candidate's TPB
    prompts = [encode_task_prompt(h, clip_vision, image[:1], hidden)[0] for h in handles]
    selection = select_plugins(tuner, text, null, prompts, [h.name for h in handles], rule)
    report = selection.report()
    log.info("Diff-Plugin selector: %s", report.replace("\n", "; "))
    return [handles[i] for i in selection.selected], report


# --- training ------------------------------------------------------------------------------------

def alphas_cumprod(model) -> torch.Tensor:
    """The DDPM schedule of the model (1000 entries for SD 1.x): alpha_bar = 1 / (1 + sigma^2)."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().float().cpu().clone()
    return 1.0 / (1.0 + sigmas ** 2)


def make_encoder(model, clip_vision, vae, device=None):
    """The frozen encoders as ``encode(name, degraded, clean) -> EncodedPair`` (one pair, on ``device``):
    VAE posterior mean x scale factor, CLIP vision last hidden states of the degraded image resized
    straight to 224 (as the official training does). ComfyUI runs each in its own dtype."""
    latent_format = model.get_model_object("latent_format")
    device = device if device is not None else model.load_device

    def encode(name: str, degraded: torch.Tensor, clean: torch.Tensor) -> pt.EncodedPair:
        with torch.no_grad():
            d_lat = latent_format.process_in(vae.encode(degraded))
            c_lat = latent_format.process_in(vae.encode(clean))
            hidden = clip_vision.encode_image(degraded, crop=False)["last_hidden_state"]
        return pt.EncodedPair(name, c_lat.to(device, torch.float32), d_lat.to(device, torch.float32),
                              hidden.to(device, torch.float32))

    return encode


def trainable_patcher(model):
    """The ModelPatcher to back-propagate through. ComfyUI 0.12+ may hand a dynamic-VRAM patcher (weights
    streamed to the GPU per layer, for inference); core's trainer (comfy_extras/nodes_train.py) trains on a
    fresh non-dynamic copy (``model.clone(force_deepcopy=True)``) loaded fully (``load_models_gpu(...,
    force_full_load=True)``). The same here: a dynamic patcher is cloned with ``disable_dynamic=True``
    (a plain ModelPatcher over weights of its own); any other patcher is used as it is (never mutated)."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        try:
            return model.clone(disable_dynamic=True)
        except RuntimeError as exc:  # a dynamic patcher that was not loaded from a file cannot be re-loaded
            raise ValueError(
                f"Diff-Plugin training: input 'model': this dynamic-VRAM model cannot be copied for training ({exc}); "
                "load it with a checkpoint loader, or start ComfyUI with --disable-dynamic-vram.") from exc
    return model


def make_eps_model(model, precision: str = "fp32"):
    """The frozen U-Net as eps(x_t, t, context, residuals): residuals added (out of place) to the skips
    that output_blocks 9, 10, 11 consume, i.e. diffusers' down_block_additional_residuals[0:3].
    The U-Net runs in its own dtype (fp16/bf16 weights stay so; the trainer's autocast decides the compute
    dtype); ``precision`` fp32 with half-precision weights runs on float32 copies of them."""
    import comfy.model_management

    model = trainable_patcher(model)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    diffusion_model = model.model.diffusion_model
    device = model.load_device
    dtype = model.model.get_dtype()
    # The U-Net runs on detached views of its weights (functional_call): its parameters may have
    # requires_grad set (ComfyUI leaves it on), and back-propagating into them would write .grad tensors
    # (the U-Net's size again) onto the caller's model. Weights loaded inside ComfyUI's inference mode
    # cannot be saved for backward: those are copied.
    state = diffusion_model.state_dict(keep_vars=True)
    if precision == "fp32" and dtype != torch.float32:
        weights = {k: v.detach().float() for k, v in state.items()}
        dtype = torch.float32
    else:
        weights = {k: v.detach().clone() if v.is_inference() else v.detach() for k, v in state.items()}

    def eps_model(x, t, context, residuals):
        kwargs = {"context": context.to(device, dtype),
                  "transformer_options": {"patches": {"output_block_patch": [hooks.skip_residual_patch(residuals)]}}}
        args = (x.to(device, dtype), t.to(device))
        out = torch.func.functional_call(diffusion_model, weights, args, kwargs, strict=False)
        return out.float()

    return eps_model


def train_from_folder(model, clip_vision, vae, data_folder: str, output: Path, *, name: str, resolution: int = 512,
                      steps: int = 1000, batch_size: int = 1, learning_rate: float = 1e-5, save_every: int = 250,
                      seed: int = 0, resume: bool = True, start_from_noise: bool = False, scb_channels: int | None = None,
                      grad_accum: int = 1, lr_scaling: str = "official", augment: bool = False,
                      precision: str = "fp32", validate_every: int = 0, validation_steps: int = 20,
                      on_step=None, on_validation=None, device=None,
                      node: str = "PlugKitTrainTaskPlugin") -> tuple[pt.TrainResult, str]:
    """Stream the pairs of ``data_folder`` into ``plugin_training.train_plugin``. ``on_validation(step,
    image [1, H, W, 3])``: each validation image (the official 20-step inference on the first pair) as
    it is made. Returns the result (``result.validations`` holds the images) and a text report."""
    unet_config = getattr(model.model.model_config, "unet_config", {}) or {}
    if unet_config.get("context_dim") != 768:
        raise ValueError(f"{node}: input 'model' is not an SD 1.x model (context dim {unet_config.get('context_dim')}); "
                         "Task-Plugins are trained on SD 1.x.")
    check_choice(precision, pt.PRECISIONS, node, "precision")
    check_choice(lr_scaling, pt.LR_SCALINGS, node, "lr_scaling")
    try:
        pairs, problems = pt.find_pairs(data_folder)
    except ValueError as exc:
        raise ValueError(f"{node}: input 'data_folder': {exc}") from exc
    usable, skipped = pt.check_pairs(pairs, resolution)
    skipped = problems + skipped
    for line in skipped:
        log.warning("Diff-Plugin training: skipped %s", line)
    if not usable:
        raise ValueError(f"{node}: input 'data_folder': no usable (degraded, clean) pair in '{data_folder}'"
                         + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    channels = scb_channels or unet_config.get("model_channels", 320)
    device = torch.device(device) if device is not None else model.load_device
    with torch.inference_mode(False), torch.enable_grad():
        encode = make_encoder(model, clip_vision, vae, device=device)
        stream = pt.PairStream(usable, resolution, encode, augment=augment)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the fresh plugin's initialisation, without touching the global RNG
            plugin = TaskPlugin(name=name, start_from_noise=start_from_noise, scb_channels=channels)
        eps_model = make_eps_model(model, precision)
        alphas = alphas_cumprod(model)
        config = pt.TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate,
                                lr_scaling=lr_scaling, save_every=save_every, seed=seed, augment=augment,
                                precision=precision)
        plugin.to(device)
        validate = None
        if validate_every > 0:
            first = usable[0]
            val_pair = encode(first[0].stem, pt.resize_crop(pt.load_image(first[0]), resolution),
                              pt.resize_crop(pt.load_image(first[1]), resolution))
            latent_format = model.get_model_object("latent_format")

            def validate(step: int):
                with pt._autocast(device, precision):
                    latent = pt.validation_sample(plugin, eps_model, val_pair, alphas, validation_steps, seed)
                image = vae.decode(latent_format.process_out(latent.float())).float().cpu().clamp(0, 1)
                image = image.reshape(-1, *image.shape[-3:])[:1]
                degraded = pt.resize_crop(pt.load_image(first[0]), resolution)
                clean = pt.resize_crop(pt.load_image(first[1]), resolution)
                image = torch.cat([degraded, image, clean], dim=2)  # input | plugin output | target
                if on_validation is not None:
                    on_validation(step, image)
                return image

        result = pt.train_plugin(plugin, eps_model, stream, alphas, config, output, resume=resume, on_step=on_step,
                                 extra_metadata={"pairs": str(len(usable)), "resolution": str(resolution)},
                                 validate=validate, validate_every=validate_every)
        plugin.to("cpu")
    losses = result.losses
    lines = [f"trained '{name}': steps {result.start_step} -> {result.end_step} on {len(usable)} pair(s), "
             f"lr {result.learning_rate:g} ({lr_scaling} scaling, global batch "
             f"{batch_size * grad_accum * pt.distributed_world()[1]}), {precision}",
             f"saved: {output}"]
    if losses:
        k = max(1, len(losses) // 10)
        lines.append(f"loss: first {sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f}")
    if stream.bad:
        skipped = skipped + [f"{usable[i][0].name}: unreadable (during training)" for i in sorted(stream.bad)]
    if skipped:
        lines.append("skipped: " + "; ".join(skipped))
    return result, "\n".join(lines)


def node_progress(plugin_name: str, steps: int, unique_id):
    """(on_step, on_validation) of the training node: ComfyUI's progress bar (with the latest validation
    image as its preview), a log line every 10 steps, and the step and loss as the node's progress text."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(steps)
    preview = [None]

    def on_validation(step: int, image: torch.Tensor) -> None:
        from PIL import Image

        arr = (image[0].clamp(0, 1).numpy() * 255).round().astype("uint8")
        preview[0] = ("PNG", Image.fromarray(arr), None)  # shown on the progress bar from now on

    def on_step(step: int, loss: float) -> None:
        bar.update_absolute(step, steps, preview[0])
        if step % 10 == 0 or step == steps:
            log.info("Diff-Plugin training %s: step %d/%d loss %.4f", plugin_name, step, steps, loss)
        if unique_id is not None:
            try:
                from server import PromptServer

                PromptServer.instance.send_progress_text(f"step {step}/{steps}  loss {loss:.4f}", unique_id)
            except Exception:  # no server (tests, command line)
                pass

    return on_step, on_validation


def result_images(result: pt.TrainResult) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation images, or a blank 64 px image when there are none; the loss curve) of a training run."""
    curve = pt.loss_curve_image(result.losses, start_step=result.start_step)
    if result.validations:
        validation = torch.cat([image for _, image in result.validations])
    else:
        validation = torch.zeros(1, 64, 64, 3)
    return validation, curve
