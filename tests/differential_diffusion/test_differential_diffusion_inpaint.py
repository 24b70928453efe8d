"""Differential Diffusion with an inpainting model (a 9-channel SD1.x U-Net: latent + mask + masked
image) and core ``InpaintModelConditioning``, in the real ComfyUI host, with a real (small) VAE.

The usual graph: InpaintModelConditioning(positive, negative, vae, pixels, mask=map) gives the
conditionings (the model's mask and masked-image inputs) and the LATENT; that LATENT and the same map
go into PlugKitDifferentialDiffusion, whose MODEL and LATENT go to the sampler.
"""
import pytest
import torch

from plugkit.nodes.differential_diffusion import change_map as cm

TOL = 1e-5
SIZE = 128  # pixels; the latent is 16x16


@pytest.fixture(scope="module")
def inpaint_env(comfy):
    from tools.fixtures.models import build_model, build_vae, random_conditioning, tiny_unet_config

    model = build_model(tiny_unet_config(in_channels=9), seed=3)
    assert model.model.concat_keys == ("mask", "masked_image")  # ComfyUI sees an inpainting model
    gen = torch.Generator().manual_seed(21)
    pixels = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size=(SIZE, SIZE),
                                             mode="bilinear").movedim(1, -1)  # smooth, image-like
    return model, build_vae(seed=4), pixels, random_conditioning(seed=5), random_conditioning(seed=6)


def inpaint_conditioning(env, comfy_nodes, mask):
    _, vae, pixels, pos, neg = env
    node = comfy_nodes.NODE_CLASS_MAPPINGS["InpaintModelConditioning"]()
    return node.encode(pos, neg, pixels, vae, mask, noise_mask=True)


def run_ours(env, comfy_nodes, change_map, *, convention="white=change", schedule="sigma", exact_keep=False, **kw):
    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion
    from tools.fixtures.models import sample

    mask = change_map if convention == "white=change" else 1 - change_map  # InpaintModelConditioning: white = inpaint
    pos, neg, latent = inpaint_conditioning(env, comfy_nodes, mask)
    m, lat = PlugKitDifferentialDiffusion.execute(model=env[0], samples=latent, change_map=change_map,
                                                  map_convention=convention, schedule=schedule,
                                                  exact_keep=exact_keep).result
    kw.setdefault("cfg", 1.0)
    return sample(m, lat["samples"], pos, neg, noise_mask=lat["noise_mask"], **kw), latent["samples"]


def test_inpaint_model_parity_with_core(inpaint_env, comfy_nodes):
    """Defaults equal core DifferentialDiffusion + InpaintModelConditioning (its noise mask = the map)."""
    from tools.fixtures.models import sample

    change = cm.linear_gradient(SIZE, SIZE)  # at image size: our default bilinear resize is core's
    ours, _ = run_ours(inpaint_env, comfy_nodes, change, cfg=2.0)
    pos, neg, latent = inpaint_conditioning(inpaint_env, comfy_nodes, change)
    core_model = comfy_nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"].execute(inpaint_env[0]).result[0]
    core = sample(core_model, latent["samples"], pos, neg, noise_mask=latent["noise_mask"], cfg=2.0)
    soft_only = sample(inpaint_env[0], latent["samples"], pos, neg, noise_mask=latent["noise_mask"], cfg=2.0)
    assert (ours - core).abs().max().item() <= TOL
    assert (ours - soft_only).abs().max().item() > 1e-2  # the per-step schedule did something


@pytest.mark.parametrize("convention", ["white=change", "white=keep"])
def test_inpaint_model_keeps_and_changes_by_region(inpaint_env, comfy_nodes, convention):
    """Left half keep, right half change (step schedule, exact_keep): the kept half is exactly the input latent."""
    change = torch.zeros(1, SIZE, SIZE)
    change[..., SIZE // 2:] = 1.0
    change_map = change if convention == "white=change" else 1 - change
    out, latent = run_ours(inpaint_env, comfy_nodes, change_map, convention=convention, schedule="step",
                           exact_keep=True)
    assert (out[..., :8] - latent[..., :8]).abs().max().item() <= TOL
    assert (out[..., 8:] - latent[..., 8:]).abs().mean().item() > 0.1


@pytest.mark.parametrize("schedule", ["sigma", "step"])
def test_inpaint_model_follows_a_gradient(inpaint_env, comfy_nodes, schedule):
    """A four-band gradient: the mean |change| of each band rises with its change value."""
    bands = (torch.arange(SIZE) * 4 // SIZE).float() / 4 + 0.125
    change = bands.view(1, 1, SIZE).expand(1, SIZE, SIZE).clone()
    out, latent = run_ours(inpaint_env, comfy_nodes, change, schedule=schedule, steps=8)
    per_band = (out - latent).abs().mean(dim=(0, 1, 2)).view(4, 4).mean(1)
    assert torch.all(per_band[1:] > per_band[:-1]), per_band


def test_inpaint_model_without_inpaint_conditioning(inpaint_env, comfy_nodes):
    """A plain VAE-encoded latent also works: ComfyUI then gives the model the (rounded) noise mask and
    the unmasked latent as its extra inputs; "keep" stays exact with the step schedule and exact_keep."""
    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion
    from tools.fixtures.models import sample

    model, vae, pixels, pos, neg = inpaint_env
    latent = {"samples": vae.encode(pixels)}
    change = torch.zeros(1, SIZE, SIZE)
    change[..., SIZE // 2:] = 1.0
    m, lat = PlugKitDifferentialDiffusion.execute(model=model, samples=latent, change_map=change,
                                                  schedule="step", exact_keep=True).result
    out = sample(m, lat["samples"], pos, neg, noise_mask=lat["noise_mask"], cfg=1.0)
    assert (out[..., :8] - latent["samples"][..., :8]).abs().max().item() <= TOL
    assert (out[..., 8:] - latent["samples"][..., 8:]).abs().mean().item() > 0.1
