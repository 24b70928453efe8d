"""Plug-and-Play test fixtures: one tiny model, source and inversion shared per module."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny U-Net is ~10x faster with one thread on this busy 2-core machine (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pnp_env(comfy):
    """(model, source latent, source conditioning, target cond, negative cond) at 16x16 latents."""
    from tools.fixtures.models import build_model, random_conditioning

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(seed=0)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    env = {
        "model": model,
        "latent": latent,
        "source_cond": random_conditioning(seed=1),
        "target_cond": random_conditioning(seed=3),
        "negative": random_conditioning(seed=2),
        "steps": 5,
    }
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    src, inv = PlugKitPnPInvert.execute(model=model, samples={"samples": latent}, conditioning=env["source_cond"],
                                        steps=5, inversion_steps=5).result
    env["source"], env["inverted"] = src, inv
    torch.set_num_threads(before)
    return env


TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 64,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


@pytest.fixture(scope="module")
def tiny_sdxl(comfy):
    """A tiny SDXL-structured ModelPatcher (9 decoder blocks, depth-2 transformers, ADM input)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from tools.fixtures.models import passthrough_init, random_init

    config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, 0)
    passthrough_init(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
