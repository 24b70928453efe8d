"""Random-weight models built with ComfyUI's own classes, for tests, demo and benchmarks.

No weights are ever downloaded. Two kinds:
- tiny U-Nets with SD1.x structure (12 decoder blocks, attention where SD1.5 has it) but 32 base
  channels, built in-process for fast host tests;
- a deterministic full-size SD1.5 checkpoint (UNet + CLIP-L + VAE, real key names, so core
  ``CheckpointLoaderSimple`` loads it), generated once into the cache.

A purely random U-Net ends sampling with latents ~15x too large, where float spacing reaches test
tolerances. ``passthrough_init`` gives the U-Net an exact path from its (already c_in-scaled) input
to its output, so its prediction is roughly its normalised input plus a small random perturbation:
latents then end at SD-like magnitudes and tolerances mean something. Requires the ComfyUI host on
``sys.path`` (see ``tools.host``).
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"
CHECKPOINT_SEED = 1234
PERTURBATION = 0.1


def tiny_unet_config(**overrides) -> dict:
    """SD1.5's U-Net layout with 32 base channels (fast on CPU; same block indices as SD1.5)."""
    cfg = copy.deepcopy(SD15_UNET_CONFIG)
    cfg["model_channels"] = 32
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def random_init(module: torch.nn.Module, seed: int) -> None:
    """Deterministic init of every parameter (ComfyUI's ops skip torch's own init)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2:
            if "embedding" in name:
                std = 0.02
            else:
                fan_in = p[0].numel()
                std = 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif leaf == "bias" or "bias" in leaf:
            p.zero_()
        elif leaf == "weight":
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, b in module.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))


@torch.no_grad()
def passthrough_init(unet: torch.nn.Module, perturbation: float = PERTURBATION) -> None:
    """Wire an exact input->output path through an (already randomly initialised) SD-style U-Net.

    conv_in copies the 4 input channels; they reach the last decoder block as its skip, whose 1x1
    skip conv picks them up; the final GroupNorm is shifted into SiLU's linear range and the output
    conv undoes the shift. Every other path into the output is scaled by ``perturbation``.
    """
    # Inpainting U-Nets take [latent, mask, masked image] (9 channels) and predict 4: only the latent
    # (the first channels of the concatenation) is passed through.
    c_in = min(unet.in_channels, unet.out_channels)
    mc = unet.model_channels
    conv_in = unet.input_blocks[0][0]
    conv_in.weight[:c_in] = 0
    conv_in.bias[:c_in] = 0
    for i in range(c_in):
        conv_in.weight[i, i, 1, 1] = 1.0
    last = unet.output_blocks[-1]
    res = last[0]
    skip = res.skip_connection
    skip.weight[:c_in] = 0
    skip.bias[:c_in] = 0
    for i in range(c_in):
        skip.weight[i, mc + i, 0, 0] = 1.0  # concat order is [h, skip]: the skip starts at mc
    res.out_layers[-1].weight[:c_in] *= perturbation
    res.out_layers[-1].bias[:c_in] = 0
    for sub in list(last)[1:]:
        proj_out = getattr(sub, "proj_out", None)
        if proj_out is not None:
            proj_out.weight[:c_in] *= perturbation
            proj_out.bias[:c_in] = 0
    norm, _, conv_out = unet.out
    shift = 10.0
    norm.weight[:c_in] = 1.0
    norm.bias[:c_in] = shift
    conv_out.weight.mul_(perturbation)
    conv_out.weight[:, :c_in] = 0
    for i in range(c_in):
        conv_out.weight[i, i, 1, 1] = 1.0
    conv_out.bias.fill_(-shift)


def build_model(unet_config: dict | None = None, seed: int = 0, dtype=torch.float32):
    """A ComfyUI ModelPatcher around a random SD1.x-family U-Net (tiny by default)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = copy.deepcopy(unet_config or tiny_unet_config())
    model_config = comfy.supported_models.SD15(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, seed)
    passthrough_init(model.diffusion_model)
    model.diffusion_model.to(dtype)
    load_device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload)


TINY_DIT_CONFIGS = {
    # Flux: 1 double + 1 single block, 64 hidden, context/pooled width 32
    "flux": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                 axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
    # SD3 MMDiT: 2 joint blocks (hidden 64 x depth = 128), context/pooled width 32
    "sd3": dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 32, "out_features": 128}},
                num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[]),
}


def build_tiny_dit(kind: str, seed: int = 0):
    """A ComfyUI ModelPatcher around a tiny random DiT ("flux" or "sd3") built with ComfyUI's own
    model configs; its conditioning wants a [B, tokens, 32] context and a [B, 32] pooled_output."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_cls = {"flux": comfy.supported_models.Flux, "sd3": comfy.supported_models.SD3}[kind]
    unet_config = copy.deepcopy(TINY_DIT_CONFIGS[kind])
    if kind == "flux":
        import dataclasses

        import comfy.ldm.flux.model

        # Required since ComfyUI 0.5 ([] is Flux.1's: no text position ids); older hosts lack the field.
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            unet_config["txt_ids_dims"] = []
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, seed)
    model.diffusion_model.float()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_vae(seed: int = 0, channels: int = 32):
    """A real ComfyUI ``comfy.sd.VAE`` with SD's KL autoencoder layout (8x down, 4 latent channels) but
    ``channels`` base channels: fast enough for host tests that encode and decode."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": channels, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
    module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    random_init(module, seed)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def build_clip_vision(seed: int = 0, layers: int = 2, intermediate: int = 256, directory: Path | None = None):
    """A real ComfyUI ``ClipVisionModel`` shaped like CLIP ViT-L/14 where it shows (224 px, 14 px
    patches, 257 tokens of width 1024) but with ``layers`` narrow encoder layers."""
    import json

    import comfy.clip_vision

    from .host import cache_dir

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024,
              "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": intermediate, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": layers, "patch_size": 14,
              "projection_dim": 768}
    directory = Path(directory or cache_dir() / "models")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tiny_clip_vision_{layers}x{intermediate}.json"
    text = json.dumps(config, indent=2)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    random_init(cv.model, seed)
    return cv


def random_conditioning(batch: int = 1, tokens: int = 77, dim: int = 768, seed: int = 0, **extra):
    """A CONDITIONING list with a random context (for models without a text encoder)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, dim, generator=gen), dict(extra)]]


def sample(model, latent: torch.Tensor, positive, negative, *, seed: int = 0, steps: int = 4,
           cfg: float = 2.0, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
           noise_mask=None, add_noise: bool = True, start_step=None, last_step=None,
           force_full_denoise: bool = True, disable_pbar: bool = True, noise: torch.Tensor | None = None
           ) -> torch.Tensor:
    """What core KSampler / KSamplerAdvanced do, callable in-process. Returns the sampled latent.
    ``noise`` replaces the seed's noise (a test controlling its inputs)."""
    import comfy.sample

    if noise is not None:
        noise = noise.expand_as(latent).contiguous()
    elif add_noise:
        noise = comfy.sample.prepare_noise(latent, seed, None)
    else:
        noise = torch.zeros_like(latent)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
        denoise=denoise, disable_noise=not add_noise, start_step=start_step, last_step=last_step,
        force_full_denoise=force_full_denoise, noise_mask=noise_mask, disable_pbar=disable_pbar,
        seed=seed,
    )


@torch.no_grad()
def _full_sd15_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models

    sd: dict[str, torch.Tensor] = {}
    cfg = copy.deepcopy(SD15_UNET_CONFIG)
    model_config = comfy.supported_models.SD15(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, seed)
    passthrough_init(model.diffusion_model)
    for k, v in model.diffusion_model.state_dict().items():
        sd["model.diffusion_model." + k] = v.half()
    del model

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    random_init(clip.transformer, seed + 1)
    for k, v in clip.transformer.state_dict().items():
        if k.startswith("text_projection"):
            continue
        sd["cond_stage_model.transformer." + k] = v.half() if v.is_floating_point() else v
    del clip

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    random_init(vae, seed + 2)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.half()
    return {k: v.contiguous() for k, v in sd.items()}


def ensure_random_sd15_checkpoint(directory: Path | None = None) -> Path:
    """Generate (once) the deterministic random-weight full-size SD1.5 checkpoint; return its path."""
    import safetensors.torch

    from .host import cache_dir

    directory = Path(directory or cache_dir() / "models")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    if path.is_file():
        return path
    log.info("Generating the random-weight SD1.5 checkpoint at %s (once) ...", path)
    # The ComfyUI classes that build it must be importable in this process (a fresh `make demo` has
    # not imported ComfyUI yet; tests already have): put the host on sys.path, CPU when no CUDA.
    from .host import setup_in_process

    setup_in_process()
    sd = _full_sd15_state_dict(CHECKPOINT_SEED)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    safetensors.torch.save_file(sd, str(tmp), metadata={"plugkit": "random weights, not a real model"})
    os.replace(tmp, path)  # atomic: concurrent or interrupted generation never leaves half a file
    return path
