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


def encode_pairs(model, clip_vision, vae, crops) -> list[pt.EncodedPair]:
    """Frozen encoders, once per pair: VAE posterior mean x scale factor, CLIP vision last hidden states
    of the degraded image resized straight to 224 (as the official training does)."""
    latent_format = model.get_model_object("latent_format")
    out = []
    for name, degraded, clean in crops:
        with torch.no_grad():
            d_lat = latent_format.process_in(vae.encode(degraded))
            c_lat = latent_format.process_in(vae.encode(clean))
            hidden = clip_vision.encode_image(degraded, crop=False)["last_hidden_state"]
        out.append(pt.EncodedPair(name, c_lat.float().cpu().clone(), d_lat.float().cpu().clone(),
                                  hidden.float().cpu().clone()))
    return out


def make_eps_model(model):
    """The frozen U-Net as eps(x_t, t, context, residuals): residuals added (out of place) to the skips
    that output_blocks 9, 10, 11 consume, i.e. diffusers' down_block_additional_residuals[0:3]."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    diffusion_model = model.model.diffusion_model
    device = model.load_device
    dtype = model.model.get_dtype()
    weights = None
    state = diffusion_model.state_dict(keep_vars=True)
    if any(v.is_inference() for v in state.values()):
        # weights loaded inside ComfyUI's inference mode cannot be saved for backward: use plain copies
        weights = {k: v.detach().clone() for k, v in state.items()}

    def eps_model(x, t, context, residuals):
        def add_residual(h, hsp, transformer_options):
            index = transformer_options["block"][1]
            if index >= SD1_SKIPS - len(residuals):
                hsp = hsp + residuals[SD1_SKIPS - 1 - index].to(hsp.dtype)
            return h, hsp

        kwargs = {"context": context.to(device, dtype),
                  "transformer_options": {"patches": {"output_block_patch": [add_residual]}}}
        args = (x.to(device, dtype), t.to(device))
        if weights is None:
            out = diffusion_model(*args, **kwargs)
        else:
            out = torch.func.functional_call(diffusion_model, weights, args, kwargs, strict=False)
        return out.float()

    return eps_model


def train_from_folder(model, clip_vision, vae, data_folder: str, output: Path, *, name: str, resolution: int = 512,
                      steps: int = 1000, batch_size: int = 1, learning_rate: float = 1e-5, save_every: int = 250,
                      seed: int = 0, resume: bool = True, start_from_noise: bool = False, scb_channels: int | None = None,
                      on_step=None, node: str = "PlugKitTrainTaskPlugin") -> tuple[pt.TrainResult, str]:
    unet_config = getattr(model.model.model_config, "unet_config", {}) or {}
    if unet_config.get("context_dim") != 768:
        raise ValueError(f"{node}: input 'model' is not an SD 1.x model (context dim {unet_config.get('context_dim')}); "
                         "Task-Plugins are trained on SD 1.x.")
    try:
        pairs, problems = pt.find_pairs(data_folder)
    except ValueError as exc:
        raise ValueError(f"{node}: input 'data_folder': {exc}") from exc
    crops, skipped = pt.read_pairs(pairs, resolution)
    skipped = problems + skipped
    for line in skipped:
        log.warning("Diff-Plugin training: skipped %s", line)
    if not crops:
        raise ValueError(f"{node}: input 'data_folder': no usable (degraded, clean) pair in '{data_folder}'"
                         + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    channels = scb_channels or unet_config.get("model_channels", 320)
    with torch.inference_mode(False), torch.enable_grad():
        encoded = encode_pairs(model, clip_vision, vae, crops)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the fresh plugin's initialisation, without touching the global RNG
            plugin = TaskPlugin(name=name, start_from_noise=start_from_noise, scb_channels=channels)
        eps_model = make_eps_model(model)
        alphas = alphas_cumprod(model)
        config = pt.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                save_every=save_every, seed=seed)
        plugin.to(model.load_device)
        for p in encoded:
            p.clean_latent, p.degraded_latent, p.clip_hidden = (
                p.clean_latent.to(model.load_device), p.degraded_latent.to(model.load_device),
                p.clip_hidden.to(model.load_device))
        result = pt.train_plugin(plugin, eps_model, encoded, alphas, config, output, resume=resume, on_step=on_step,
                                 extra_metadata={"pairs": str(len(encoded)), "resolution": str(resolution)})
        plugin.to("cpu")
    losses = result.losses
    lines = [f"trained '{name}': steps {result.start_step} -> {result.end_step} on {len(encoded)} pair(s)",
             f"saved: {output}"]
    if losses:
        k = max(1, len(losses) // 10)
        lines.append(f"loss: first {sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f}")
    if skipped:
        lines.append("skipped: " + "; ".join(skipped))
    return result, "\n".join(lines)


def output_path(plugin_name: str, node: str) -> Path:
    """models/diff_plugin/<plugin_name>.safetensors (in the first registered folder); a name that is absolute,
    climbs out with '..' or leads through a link out of the folder is refused. Creates only the folder."""
    from . import plugin_files
    from .plugin_nodes import plugin_folders

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
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pairs per step."),
                io.Float.Input("learning_rate", default=1e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate (official: 1e-5, weight decay 1e-2)."),
                io.Int.Input("save_every", default=250, min=0, max=1_000_000,
                             tooltip="Save the plugin every N steps (0: only at the end). Saves are atomic."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the noise and timesteps."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the last save of this plugin_name if there is one. Off: "
                                         "an existing file of that name is an error (never overwritten)."),
                io.Combo.Input("start", options=["input", "noise"], default="input",
                               tooltip="How sampling with this plugin starts: the noised input (most tasks) or pure "
                                       "noise (like lowlight / highlight)."),
            ],
            outputs=[io.Custom("PLUGKIT_TASK_PLUGIN").Output(display_name="plugin"),
                     io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, data_folder: str, plugin_name: str, resolution: int = 512,
                steps: int = 1000, batch_size: int = 1, learning_rate: float = 1e-5, save_every: int = 250,
                seed: int = 0, resume: bool = True, start: str = "input") -> io.NodeOutput:
        import comfy.utils

        from .scb_control import PluginHandle

        node = "PlugKitTrainTaskPlugin"
        if start not in ("input", "noise"):
            raise ValueError(f"{node}: input 'start' is {start!r}; use 'input' or 'noise'.")
        output = output_path(plugin_name, node)
        pt.check_output(output, resume, node)
        output.parent.mkdir(parents=True, exist_ok=True)  # inside models/diff_plugin (checked above)
        bar = comfy.utils.ProgressBar(steps)
        unique_id = getattr(getattr(cls, "hidden", None), "unique_id", None)

        def on_step(step: int, loss: float) -> None:
            bar.update_absolute(step, steps)
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
            resume=resume, start_from_noise=start == "noise", on_step=on_step, node=node)
        return io.NodeOutput(PluginHandle(result.plugin, source=str(output)), report, ui=ui.PreviewText(report))


NODES = [PlugKitTrainTaskPlugin]
