"""Training a Task-Plugin from ComfyUI: the PlugKitTrainTaskPlugin node and the glue the command
line (``train_cli.py``) shares with it. The training loop itself is in plugin_training.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..comfy_io import io, ui
from . import plugin_training as pt
from .task_plugin import TaskPlugin

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Diff-Plugin"
SD1_SKIPS = 12


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


def encode_pairs(model, clip_vision, vae, crops) -> list[pt.EncodedPair]:
    """Every crop encoded at once, on the CPU (small sets and tests; training streams: ``make_encoder``)."""
    encode = make_encoder(model, clip_vision, vae, device="cpu")
    return [encode(name, degraded, clean) for name, degraded, clean in crops]


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
        def add_residual(h, hsp, transformer_options):
            index = transformer_options["block"][1]
            if index >= SD1_SKIPS - len(residuals):
                hsp = hsp + residuals[SD1_SKIPS - 1 - index].to(hsp.dtype)
            return h, hsp

        kwargs = {"context": context.to(device, dtype),
                  "transformer_options": {"patches": {"output_block_patch": [add_residual]}}}
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
    if precision not in pt.PRECISIONS:
        raise ValueError(f"{node}: input 'precision' is {precision!r}; use one of {', '.join(pt.PRECISIONS)}.")
    if lr_scaling not in pt.LR_SCALINGS:
        raise ValueError(f"{node}: input 'lr_scaling' is {lr_scaling!r}; use one of {', '.join(pt.LR_SCALINGS)}.")
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


def output_path(plugin_name: str, node: str) -> Path:
    """models/diff_plugin/<plugin_name>.safetensors (in the first registered folder); a name that is absolute,
    climbs out with '..' or leads through a link out of the folder is refused. Creates only the folder."""
    from . import plugin_files
    from .nodes import plugin_folders

    parts = plugin_files.safe_relative_name(plugin_name.strip() if isinstance(plugin_name, str) else plugin_name)
    if parts is None:
        raise ValueError(f"{node}: input 'plugin_name' must be a relative file name such as 'my_derain', got {plugin_name!r}.")
    if not parts[-1].endswith(".safetensors"):
        parts = (*parts[:-1], parts[-1] + ".safetensors")
    base = Path(plugin_folders()[0])
    path = base.joinpath(*parts)
    base.mkdir(parents=True, exist_ok=True)
    base_real = os.path.realpath(base)
    # the file (if it exists) and the deepest existing folder on its way must lie inside the base (no link out)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    inside = os.path.realpath(existing) == base_real or plugin_files.is_inside(os.path.realpath(existing), base_real)
    if not inside or (os.path.lexists(path) and not plugin_files.is_inside(os.path.realpath(path), base_real)):
        raise ValueError(f"{node}: input 'plugin_name' must name a file inside models/diff_plugin, got {plugin_name!r}.")
    return path


class PlugKitTrainTaskPlugin(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlugKitTrainTaskPlugin",
            display_name="Train Diff-Plugin Task-Plugin",
            category=CATEGORY,
            description="Trains a new Task-Plugin (TPB + SCB) on a folder of (degraded, clean) image pairs with "
                        "the U-Net, VAE and CLIP vision frozen; saves models/diff_plugin/<plugin_name>.safetensors.",
            inputs=[
                io.Model.Input("model", tooltip="The frozen SD 1.x model (LoRAs and patches apply)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model (frozen)."),
                io.Vae.Input("vae", tooltip="The SD 1.x VAE (frozen)."),
                io.String.Input("data_folder", default="",
                                tooltip="Folder with 'input/' (degraded) and 'target/' (clean) images paired by file "
                                        "name (also accepted: degraded|lq and gt|clean)."),
                io.String.Input("plugin_name", default="my_plugin",
                                tooltip="Output name: models/diff_plugin/<plugin_name>.safetensors (+ .optim.pt)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training crop size in pixels (official: 512)."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Total optimisation steps (resuming counts the saved ones)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Pairs per micro-step (official train_batch_size; default 1)."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="Base AdamW learning rate (official: 1e-5, weight decay 1e-2); see "
                                       "lr_scaling."),
                io.Int.Input("save_every", default=250, min=0, max=1_000_000,
                             tooltip="Save the plugin every N steps (0: only at the end). Saves are atomic."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the noise and timesteps."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the last save of this plugin_name if there is one. Off: "
                                         "an existing file of that name is an error (never overwritten)."),
                io.Combo.Input("start", options=["input", "noise"], default="input",
                               tooltip="How sampling with this plugin starts: the noised input (most tasks) or pure "
                                       "noise (like lowlight / highlight)."),
                io.Int.Input("grad_accum", default=1, min=1, max=1024, optional=True,
                             tooltip="Micro-batches accumulated per step (official gradient_accumulation_steps; "
                                     "default 1): a step sees batch_size x grad_accum pairs."),
                io.Combo.Input("lr_scaling", options=list(pt.LR_SCALINGS), default="official", optional=True,
                               tooltip="official (train.py's scale_lr, always on there): the learning rate is "
                                       "multiplied by batch_size x grad_accum (x GPUs); none: used as given."),
                io.Boolean.Input("augment", default=False, optional=True,
                                 tooltip="Official --use_data_aug: random crop (p 1/2) and horizontal flip (p 1/2), "
                                         "the same for both images, then resize to the resolution. Off (the "
                                         "official default): short side resized, centre crop (the official "
                                         "squashes the whole image to a square instead)."),
                io.Combo.Input("precision", options=list(pt.PRECISIONS), default="fp32", optional=True,
                               tooltip="Compute dtype of the forward (autocast). The plugin keeps fp32 weights; "
                                       "fp16 uses loss scaling; bf16 needs a GPU that has it. fp32 is exact but "
                                       "slowest."),
                io.Int.Input("validate_every", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Every N steps run the official 20-step inference on the first pair and show "
                                     "it (input | plugin | target) on the progress bar and the 'validation' "
                                     "output; 0: never."),
            ],
            outputs=[io.Custom("PLUGKIT_TASK_PLUGIN").Output(display_name="plugin"),
                     io.String.Output(display_name="report"),
                     io.Image.Output(display_name="validation",
                                     tooltip="The validation images (input | plugin output | target), one per "
                                             "validation; a blank image when validate_every is 0."),
                     io.Image.Output(display_name="loss_curve", tooltip="The loss of every step, drawn.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, data_folder: str, plugin_name: str, resolution: int = 512,
                steps: int = 1000, batch_size: int = 1, learning_rate: float = 1e-5, save_every: int = 250,
                seed: int = 0, resume: bool = True, start: str = "input", grad_accum: int = 1,
                lr_scaling: str = "official", augment: bool = False, precision: str = "fp32",
                validate_every: int = 0) -> io.NodeOutput:
        import comfy.utils

        from .hooks import PluginHandle

        node = "PlugKitTrainTaskPlugin"
        if start not in ("input", "noise"):
            raise ValueError(f"{node}: input 'start' is {start!r}; use 'input' or 'noise'.")
        output = output_path(plugin_name, node)
        pt.check_output(output, resume, node)
        output.parent.mkdir(parents=True, exist_ok=True)  # inside models/diff_plugin (checked above)
        bar = comfy.utils.ProgressBar(steps)
        unique_id = getattr(getattr(cls, "hidden", None), "unique_id", None)

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

        result, report = train_from_folder(
            model, clip_vision, vae, data_folder, output, name=output.stem, resolution=resolution,
            steps=steps, batch_size=batch_size, learning_rate=learning_rate, save_every=save_every, seed=seed,
            resume=resume, start_from_noise=start == "noise", grad_accum=grad_accum, lr_scaling=lr_scaling,
            augment=augment, precision=precision, validate_every=validate_every, on_step=on_step,
            on_validation=on_validation, node=node)
        curve = pt.loss_curve_image(result.losses, start_step=result.start_step)
        if result.validations:
            validation = torch.cat([image for _, image in result.validations])
        else:
            validation = torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(PluginHandle(result.plugin, source=str(output)), report, validation, curve,
                             ui=ui.PreviewText(report))


