"""Writes the Diff-Plugin workflows, their input images, and random-weight test models.

``python -m tools.workflows diff_plugin``. Writes
- ``workflows/input/diffplugin_rain.png`` and ``diffplugin_rain_haze.png``: small degraded pictures
  (drawn here, 512x512, the size the released plugins expect: a house under rain streaks, the second
  also hazy);
- ``workflows/diff_plugin_derain.json`` (UI format): CheckpointLoaderSimple, CLIPVisionLoader,
  PlugKitTaskPluginLoader (derain), LoadImage -> PlugKitApplyTaskPlugin -> KSampler (cfg 1, UniPC,
  20 steps, close to the official inference) -> VAEDecode -> SaveImage, and beside it
  PlugKitRunPluginChain (the same plugin, official sampler: exactly the official inference) -> SaveImage;
- ``workflows/diff_plugin_selector.json``: three loaders (derain, desnow, dehaze) ->
  PlugKitPluginSelector (instruction) -> PlugKitRunPluginChain -> SaveImage.

``prepare_models(directory)`` generates the models these workflows need, with random weights, so the
end-to-end server can run them without downloads: a CLIP ViT-L/14 vision checkpoint that core
CLIPVisionLoader accepts, Task-Plugins in the exact released layout and a Plugin-Selector. It returns
``{path relative to models/: file or folder}`` for ``ComfyServer(model_files=...)``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from tools.harness.host import REPO, cache_dir

log = logging.getLogger("plugkit.workflows.diff_plugin")

SIZE = 512
RAIN = "diffplugin_rain.png"
RAIN_HAZE = "diffplugin_rain_haze.png"
DERAIN_WORKFLOW = "diff_plugin_derain.json"
SELECTOR_WORKFLOW = "diff_plugin_selector.json"
# The file name users have for CLIP ViT-L/14 vision (openai/clip-vit-large-patch14's model.safetensors,
# as ComfyUI-Manager saves it into models/clip_vision/); the random stand-in is linked under it.
CLIP_VISION_NAME = "clip-vit-large-patch14.safetensors"
RANDOM_CLIP_VISION_FILE = "plugkit_random_clip_vit_l14.safetensors"  # cache file name only
TASKS = ("derain", "desnow", "dehaze")
SELECTOR = "plugin_selector/PromptTunner.pt"
STEPS = 20  # the official inference steps (UniPC); tests and the demo shorten the run on a CPU
CHAIN_STEPS = 20  # the chain's first plugin (official 20; each later one 3)
MODELS_VERSION = "1"

# The released SCB config (pre-trained/derain/scb/config.json, diffusers 0.17.1).
RELEASED_SCB_CONFIG = {
    "_class_name": "SCBNet", "_diffusers_version": "0.17.1", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320], "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default", "upcast_attention": False,
    "use_linear_projection": False,
}


# --- images ---------------------------------------------------------------------------------------

def clean_image(size: int = SIZE) -> Image.Image:
    """A red-roofed house on grass under a blue sky (flat colours)."""
    img = Image.new("RGB", (size, size), (120, 170, 230))
    d = ImageDraw.Draw(img)
    s = size / 64
    d.rectangle([0, 44 * s, 64 * s, 64 * s], fill=(70, 140, 60))
    d.rectangle([18 * s, 28 * s, 46 * s, 48 * s], fill=(230, 220, 190))
    d.polygon([(14 * s, 30 * s), (32 * s, 14 * s), (50 * s, 30 * s)], fill=(180, 40, 40))
    d.rectangle([28 * s, 36 * s, 35 * s, 48 * s], fill=(100, 60, 30))
    d.ellipse([48 * s, 4 * s, 60 * s, 16 * s], fill=(250, 230, 90))
    return img


def add_rain(img: Image.Image, seed: int = 0) -> Image.Image:
    import random

    rng = random.Random(seed)
    layer = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(layer)
    w, h = img.size
    s = w / 64  # drawn at 64 px originally: same streak density and width at every size
    for _ in range(int(w * h / 40 / (s * s))):
        x, y = rng.uniform(-10 * s, w), rng.uniform(-10 * s, h)
        length = rng.uniform(4, 9) * s
        d.line([(x, y), (x + length * 0.35, y + length)], fill=rng.randint(120, 220), width=max(1, round(s)))
    layer = layer.filter(ImageFilter.GaussianBlur(0.4 * s))
    return Image.composite(Image.new("RGB", img.size, (235, 235, 245)), img, layer)


def add_haze(img: Image.Image, amount: float = 0.45) -> Image.Image:
    return Image.blend(img, Image.new("RGB", img.size, (200, 200, 205)), amount)


def write_images() -> None:
    inputs = REPO / "workflows" / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    add_rain(clean_image()).save(inputs / RAIN, optimize=True)
    add_haze(add_rain(clean_image(), seed=1)).save(inputs / RAIN_HAZE, optimize=True)


# --- random-weight models -------------------------------------------------------------------------

def _pack_module(name: str):
    """One of the pack's comfy-free Diff-Plugin modules, loaded by path (``nodes`` may be ComfyUI's here)."""
    import importlib.util
    import sys

    key = f"_plugkit_diff_plugin_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "nodes" / "diff_plugin" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _random_state(module, seed: int, scale: float = 1.0, output_scale: float | None = None):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.ndim > 1:
            t = torch.randn(v.shape, generator=gen) * (scale / math.sqrt(v[0].numel()))
        elif k.endswith("weight") and ("norm" in k or "visual_projection.1" in k or "visual_projection.4" in k):
            t = torch.ones(v.shape)
        else:
            t = torch.zeros(v.shape)
        if output_scale is not None and k.startswith("controlnet_down_blocks"):
            t = t * output_scale
        out[k] = t.contiguous()
    return out


def write_released_plugin(folder: Path, seed: int) -> Path:
    """A Task-Plugin folder in the exact released layout (scb/config.json, scb/diffusion_pytorch_model.bin,
    tpb.pt = {'model': state_dict}), random weights."""
    import torch

    task_plugin = _pack_module("task_plugin")
    SpatialComplementBranch, TaskPromptBranch = task_plugin.SpatialComplementBranch, task_plugin.TaskPromptBranch

    (folder / "scb").mkdir(parents=True, exist_ok=True)
    (folder / "scb" / "config.json").write_text(json.dumps(RELEASED_SCB_CONFIG, indent=2))
    torch.save(_random_state(SpatialComplementBranch(), seed, output_scale=0.05),
               folder / "scb" / "diffusion_pytorch_model.bin")
    torch.save({"model": _random_state(TaskPromptBranch(), seed + 1)}, folder / "tpb.pt")
    return folder


def write_selector(path: Path, seed: int) -> Path:
    import torch

    PromptTuner = _pack_module("plugin_selector").PromptTuner

    path.parent.mkdir(parents=True, exist_ok=True)
    state = _random_state(PromptTuner(), seed)
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save({"model": state}, path)
    return path


def write_clip_vision(path: Path, seed: int = 77) -> Path:
    """Random CLIP ViT-L/14 vision weights in the transformers key layout (fp16), as core
    CLIPVisionLoader reads them (clip_vision_config_vitl.json is picked from the key set)."""
    import torch
    import safetensors.torch

    hidden, inter, layers, patch, positions = 1024, 4096, 24, 14, 257
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=None):
        std = std if std is not None else 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else 1)
        return (torch.randn(*shape, generator=gen) * std).half()

    sd = {
        "vision_model.embeddings.class_embedding": rnd(hidden, std=0.02),
        "vision_model.embeddings.patch_embedding.weight": rnd(hidden, 3, patch, patch, std=1.0 / math.sqrt(3 * patch * patch)),
        "vision_model.embeddings.position_embedding.weight": rnd(positions, hidden, std=0.02),
        "vision_model.pre_layrnorm.weight": torch.ones(hidden).half(),
        "vision_model.pre_layrnorm.bias": torch.zeros(hidden).half(),
        "vision_model.post_layernorm.weight": torch.ones(hidden).half(),
        "vision_model.post_layernorm.bias": torch.zeros(hidden).half(),
        "visual_projection.weight": rnd(768, hidden),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            sd[p + n + ".weight"] = torch.ones(hidden).half()
            sd[p + n + ".bias"] = torch.zeros(hidden).half()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{n}.weight"] = rnd(hidden, hidden, std=0.5 / math.sqrt(hidden))
            sd[p + f"self_attn.{n}.bias"] = torch.zeros(hidden).half()
        sd[p + "mlp.fc1.weight"] = rnd(inter, hidden, std=0.5 / math.sqrt(hidden))
        sd[p + "mlp.fc1.bias"] = torch.zeros(inter).half()
        sd[p + "mlp.fc2.weight"] = rnd(hidden, inter, std=0.5 / math.sqrt(inter))
        sd[p + "mlp.fc2.bias"] = torch.zeros(hidden).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(path)
    return path


def prepare_models(directory: Path | None = None) -> dict[str, Path]:
    """Generate (once; cached by version) the random-weight models the Diff-Plugin workflows need.

    Returns ``{path under models/: file or folder}``, e.g. ``{"clip_vision/<name>": file,
    "diff_plugin/derain": folder, ..., "diff_plugin/plugin_selector": folder}``; pass it as
    ``ComfyServer(model_files=...)``."""
    directory = Path(directory or cache_dir() / "models" / "diff_plugin_random")
    stamp = directory / ".version"
    clip = directory / "clip_vision" / RANDOM_CLIP_VISION_FILE
    plugins = {task: directory / "diff_plugin" / task for task in TASKS}
    selector = directory / "diff_plugin" / SELECTOR
    ready = stamp.is_file() and stamp.read_text() == MODELS_VERSION and clip.is_file() and selector.is_file() \
        and all((p / "tpb.pt").is_file() for p in plugins.values())
    if not ready:
        directory.mkdir(parents=True, exist_ok=True)
        log.info("Diff-Plugin: generating random-weight test models in %s", directory)
        if not clip.is_file():
            write_clip_vision(clip)
        for i, (task, folder) in enumerate(plugins.items()):
            write_released_plugin(folder, seed=100 + 10 * i)
        write_selector(selector, seed=7)
        stamp.write_text(MODELS_VERSION)
    files = {f"clip_vision/{CLIP_VISION_NAME}": clip}
    files.update({f"diff_plugin/{task}": folder for task, folder in plugins.items()})
    files["diff_plugin/plugin_selector"] = selector.parent
    return files


# --- workflows ------------------------------------------------------------------------------------

# The shipped pictures are 64 px drawings so the workflows run on CPU in the tests: 'none' keeps them at
# 64 px. For real photos set 'resize' to infer.py (the nodes' default, the official rule).
TEST_PICTURE_RESIZE = "none"

def build_derain(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    cv = wf.add("CLIPVisionLoader", title="CLIP ViT-L/14 vision", clip_name=CLIP_VISION_NAME)
    plugin = wf.add("PlugKitTaskPluginLoader", title="Task-Plugin (released folder models/diff_plugin/derain)",
                    plugin_name="derain")
    img = wf.add("LoadImage", title="Degraded image", image=RAIN)
    apply = wf.add("PlugKitApplyTaskPlugin", model=ckpt[0], plugin=plugin[0], clip_vision=cv[0], vae=ckpt[2],
                   image=img[0], strength=1.0, start="official (per task)", resize=TEST_PICTURE_RESIZE)
    neg = wf.add("CLIPTextEncode", title="Unused negative (cfg 1 runs the positive only)", clip=ckpt[1], text="")
    ks = wf.add("KSampler", title="KSampler (cfg 1, UniPC 20 steps: close to the official inference)",
                model=apply[0], positive=apply[1], negative=neg[0], latent_image=apply[2], seed=42, steps=STEPS,
                cfg=1.0, sampler_name="uni_pc_bh2", scheduler="normal", denoise=1.0)
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", title="Derained (graph route)", images=dec[0], filename_prefix="plugkit_diffplugin_derain")
    official = wf.add("PlugKitRunPluginChain", title="Official sampling, exactly (one plugin)", model=ckpt[0],
                      plugin=plugin[0], clip_vision=cv[0], vae=ckpt[2], image=img[0], seed=42, steps=STEPS,
                      later_steps=3, sampler_name="official", scheduler="normal", start="official (per task)",
                      resize=TEST_PICTURE_RESIZE)
    wf.add("SaveImage", title="Derained (official sampling)", images=official[0],
           filename_prefix="plugkit_diffplugin_derain_official")
    return wf


def build_selector(info: dict):
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    cv = wf.add("CLIPVisionLoader", title="CLIP ViT-L/14 vision", clip_name=CLIP_VISION_NAME)
    loaders = [wf.add("PlugKitTaskPluginLoader", title=f"Task-Plugin {task}", plugin_name=task) for task in TASKS]
    img = wf.add("LoadImage", title="Degraded image (rain and haze)", image=RAIN_HAZE)
    sel = wf.add("PlugKitPluginSelector", clip=ckpt[1], clip_vision=cv[0], image=img[0],
                 instruction="remove the rain and the haze", selector_name=SELECTOR, rule="official (score > 0)",
                 **{f"plugin_{i + 1}": loader[0] for i, loader in enumerate(loaders)})
    chain = wf.add("PlugKitRunPluginChain", title="Run Plugin Chain (official sampler: first plugin 20 steps, later ones 3)",
                   model=ckpt[0], plugins=sel[0], clip_vision=cv[0], vae=ckpt[2],
                   image=img[0], seed=42, steps=CHAIN_STEPS, later_steps=3, sampler_name="official",
                   scheduler="normal", start="official (per task)", resize=TEST_PICTURE_RESIZE)
    wf.add("SaveImage", title="Result of the selected plugins", images=chain[0],
           filename_prefix="plugkit_diffplugin_selector")
    return wf


def workflows(info: dict) -> dict:
    return {DERAIN_WORKFLOW: build_derain(info), SELECTOR_WORKFLOW: build_selector(info)}
