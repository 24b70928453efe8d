"""Diff-Plugin nodes: load Task-Plugins, apply one, select plugins from an instruction, run a chain, train one.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks", CVPR 2024
(https://arxiv.org/abs/2403.00644); official code yuhaoliu7456/Diff-Plugin. The released plugin
weights are CC BY-NC-SA 4.0 (non-commercial). The math lives in task_plugin.py / plugin_selector.py /
official_unipc.py / plugin_training.py, the model runs in runs.py, the sampling hooks in hooks.py, the
models/diff_plugin folder in model_folders.py; this file is glue.
"""
from __future__ import annotations

import logging

from ..comfy_io import io, ui
from ..node_errors import check_choice
from . import hooks, model_folders, runs
from . import plugin_training as pt
from .official_resize import RESIZE_INFER, RESIZE_RULES
from .plugin_selector import RULE_OFFICIAL, RULES
from .runs import OFFICIAL_SAMPLER, SAMPLER_STARTS, SAMPLERS, START_IMAGE, START_OFFICIAL, STARTS

log = logging.getLogger(__name__)

CATEGORY = "PlugKit/Diff-Plugin"
TaskPluginType = io.Custom("PLUGKIT_TASK_PLUGIN")
TaskPluginListType = io.Custom("PLUGKIT_TASK_PLUGIN_LIST")
MAX_CANDIDATES = 8
TRAIN_STARTS = ("input", "noise")
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
                io.Combo.Input("plugin_name", options=model_folders.options(0),
                               tooltip="A plugin under models/diff_plugin: a released task folder such as 'derain' "
                                       "(holding scb/ and tpb.pt) or a .safetensors plugin."),
            ],
            outputs=[TaskPluginType.Output(display_name="plugin")],
        )

    @classmethod
    def fingerprint_inputs(cls, plugin_name: str):
        """ComfyUI re-runs the loader when this changes: a plugin retrained under the same name is reloaded."""
        return model_folders.name_fingerprint(plugin_name, "PlugKitTaskPluginLoader", "plugin")

    @classmethod
    def execute(cls, plugin_name: str) -> io.NodeOutput:
        return io.NodeOutput(runs.load_task_plugin(plugin_name, "PlugKitTaskPluginLoader"))


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
        m, positive, latent = runs.apply_task_plugin(model, plugin, clip_vision, vae, image, strength, start=start, resize=resize)
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
                io.Combo.Input("selector_name", options=model_folders.options(1),
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
        return model_folders.name_fingerprint(selector_name, "PlugKitPluginSelector", "selector")

    @classmethod
    def execute(cls, clip, clip_vision, image, instruction: str, selector_name: str, rule: str = RULE_OFFICIAL,
                **candidates) -> io.NodeOutput:
        node = "PlugKitPluginSelector"
        check_choice(rule, RULES, node, "rule")
        handles = [candidates[f"plugin_{i}"] for i in range(1, MAX_CANDIDATES + 1)
                   if candidates.get(f"plugin_{i}") is not None]
        if not handles:
            raise ValueError(f"{node}: connect at least one Task-Plugin to plugin_1 ... plugin_{MAX_CANDIDATES}.")
        chosen, report = runs.select_for_instruction(clip, clip_vision, image, instruction, selector_name, rule,
                                                     handles, node)
        return io.NodeOutput(chosen, report, ui=ui.PreviewText(report))


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
        check_choice(sampler_name, SAMPLERS, "PlugKitRunPluginChain", "sampler_name")
        check_choice(scheduler, SCHEDULERS, "PlugKitRunPluginChain", "scheduler")
        chain = list(plugins or []) + ([plugin] if plugin is not None else [])
        if not chain:
            log.info("Diff-Plugin chain: no plugin selected; returning the input image")
            return io.NodeOutput(image)
        out = runs.run_plugin_chain(model, chain, clip_vision, vae, image, seed=seed, steps=steps,
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
        check_choice(start, SAMPLER_STARTS, "PlugKitDiffPluginSampler", "start")
        return io.NodeOutput(runs.official_sampler(start))


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
        return io.NodeOutput(runs.official_model_sigmas(model, steps))


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
                io.Combo.Input("start", options=list(TRAIN_STARTS), default="input",
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
            outputs=[TaskPluginType.Output(display_name="plugin"),
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
        node = "PlugKitTrainTaskPlugin"
        check_choice(start, TRAIN_STARTS, node, "start")
        output = model_folders.output_path(plugin_name, node)
        pt.check_output(output, resume, node)
        output.parent.mkdir(parents=True, exist_ok=True)  # inside models/diff_plugin (checked above)
        unique_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        on_step, on_validation = runs.node_progress(plugin_name, steps, unique_id)
        result, report = runs.train_from_folder(
            model, clip_vision, vae, data_folder, output, name=output.stem, resolution=resolution,
            steps=steps, batch_size=batch_size, learning_rate=learning_rate, save_every=save_every, seed=seed,
            resume=resume, start_from_noise=start == "noise", grad_accum=grad_accum, lr_scaling=lr_scaling,
            augment=augment, precision=precision, validate_every=validate_every, on_step=on_step,
            on_validation=on_validation, node=node)
        validation, curve = runs.result_images(result)
        return io.NodeOutput(hooks.PluginHandle(result.plugin, source=str(output)), report, validation, curve,
                             ui=ui.PreviewText(report))


NODES = [PlugKitTaskPluginLoader, PlugKitApplyTaskPlugin, PlugKitPluginSelector, PlugKitRunPluginChain,
         PlugKitDiffPluginSampler, PlugKitDiffPluginSigmas, PlugKitTrainTaskPlugin]
