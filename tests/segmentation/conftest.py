"""Segmentation test fixtures: synthetic textured scenes, a tiny U-Net and VAE, one trained segmenter.

Design (measured while writing these tests, see docs/segmentation.md):
- 256 px scenes (32x32 latents): an ellipse of a 1 px checkerboard on a background of 8 px
  checker blocks, both made of the same two colours in equal shares, so each pixel's colour has the
  same distribution inside and outside: only texture separates the classes (an MLP on raw pixels
  is at chance, a test below checks it);
- the tiny VAE's latent is scaled so that, after SD's 0.18215 factor, it has about unit std, as the
  real SD VAE's (otherwise the fixed noise at t = 250 is five times the signal);
- the tiny U-Net has SD1.5's block layout without its transformer blocks: random self-attention is
  near-uniform and adds each image's mean feature to every cell, an image-specific offset that
  random (untrained) weights cannot make meaningful; with it, held-out IoU measured 0.909 / 0.884.
"""
import pytest
import torch

SIZE = 256
VAE_SCALE = 7.0


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def textured_scene(seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (H, W, 3), mask (H, W)) as described in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    c1 = torch.tensor([0.85, 0.35, 0.2])
    c2 = torch.tensor([0.15, 0.45, 0.8])
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.rand(2, generator=g) * 0.3 + 0.35) * size
    ry, rx = (torch.rand(2, generator=g) * 0.1 + 0.3) * size
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
    coarse = (((yy // 8) + (xx // 8)) % 2).bool()
    fine = ((yy + xx) % 2).bool()
    pick = torch.where(mask.bool(), fine, coarse)
    image = torch.where(pick[..., None], c1, c2)
    image = (image + torch.randn(size, size, 3, generator=g) * 0.02).clamp(0, 1)
    return image, mask


def calibrated_vae(seed: int = 0):
    from tools.fixtures.models import build_vae

    vae = build_vae(seed=seed)
    fsm = vae.first_stage_model
    with torch.no_grad():
        fsm.quant_conv.weight[:4] *= VAE_SCALE
        fsm.quant_conv.bias[:4] *= VAE_SCALE
        fsm.post_quant_conv.weight /= VAE_SCALE
    return vae


def conv_unet_config():
    from tools.fixtures.models import tiny_unet_config

    base = tiny_unet_config()
    return tiny_unet_config(transformer_depth=[0] * len(base["transformer_depth"]),
                            transformer_depth_output=[0] * len(base["transformer_depth_output"]),
                            transformer_depth_middle=0)


@pytest.fixture(scope="module")
def seg_env(comfy):
    from tools.fixtures.models import build_model

    torch.set_num_threads(1)
    scenes = [textured_scene(s) for s in range(4)]
    return {"model": build_model(conv_unet_config(), seed=0), "vae": calibrated_vae(),
            "images": torch.stack([s[0] for s in scenes]), "masks": torch.stack([s[1] for s in scenes])}


@pytest.fixture(scope="module")
def trained(seg_env):
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegmenterTrain

    torch.set_num_threads(1)
    env = seg_env
    return PlugKitFeatureSegmenterTrain.execute(model=env["model"], vae=env["vae"], images=env["images"][:2],
                                                masks=env["masks"][:2], ensemble_size=4, seed=0).result
