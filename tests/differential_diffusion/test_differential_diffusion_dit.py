"""Differential Diffusion on models without a U-Net: the mask function needs only ``model_sampling``.

Two checks: (1) the mask function, given a model object that has *nothing but* ``model_sampling``
(of the U-Net, Flux and SD3 kinds), works for every sigma of a schedule, so it cannot be touching
network internals; (2) tiny random Flux and SD3 (DiT) models built with ComfyUI's own classes sample with
the node: "keep" is exact, a gradient is followed, and it matches core's pair at defaults.
"""
from types import SimpleNamespace

import pytest
import torch

from plugkit.nodes.differential_diffusion import change_map as cm

TOL = 1e-5


def model_samplings():
    import comfy.model_sampling as ms
    import comfy.supported_models as sm

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class Flux(ms.ModelSamplingFlux, ms.CONST):
        pass

    class SD3(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    return {
        "sd15": Eps(sm.SD15({})),
        "flux": Flux(),
        "sd3": SD3(),
    }


@pytest.mark.parametrize("kind", ["sd15", "flux", "sd3"])
@pytest.mark.parametrize("schedule", ["sigma", "step"])
def test_mask_function_uses_only_model_sampling(comfy, kind, schedule):
    import comfy.samplers

    from plugkit.nodes.differential_diffusion.hooks import DenoiseMaskSchedule

    sampling = model_samplings()[kind]
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 6)
    bare = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling))  # nothing else to touch
    change = cm.linear_gradient(8, 8).unsqueeze(1).expand(1, 4, 8, 8)
    fn = DenoiseMaskSchedule(schedule)
    freed = []
    for s in sigmas[:-1]:
        out = fn(s.view(1), change, {"model": bare, "sigmas": sigmas})
        assert out.shape == change.shape
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        freed.append(out.mean().item())
    assert freed == sorted(freed) and freed[0] < freed[-1]  # more pixels free as sampling proceeds


def dit_env(kind: str, **cond_extra):
    """A tiny random DiT built with ComfyUI's classes (tools.fixtures.models), a latent and two conditionings."""
    from tools.fixtures.models import build_tiny_dit

    patcher = build_tiny_dit(kind, seed=0)
    # ComfyUI's MMDiT registers pos_embed as an empty buffer (a checkpoint fills it) and random_init
    # sets parameters only: unfilled, the tiny SD3 reads uninitialised memory and samples NaN or not
    # depending on what the allocator hands back (it did once the tests imported hooks, not nodes).
    for name, buffer in patcher.model.diffusion_model.named_buffers():
        if name == "pos_embed":
            buffer.zero_()
    gen = torch.Generator().manual_seed(0)

    def cond():
        return [[torch.randn(1, 8, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen),
                                                         **cond_extra}]]

    latent = torch.randn(1, 16, 16, 16, generator=gen)
    return patcher, latent, cond(), cond()


@pytest.fixture(scope="module")
def tiny_flux(comfy):
    return dit_env("flux", guidance=3.5)


@pytest.fixture(scope="module")
def tiny_sd3(comfy):
    return dit_env("sd3")


@pytest.fixture(params=["flux", "sd3"])
def tiny_dit(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def run(env, model, noise_mask=None, **kw):
    from tools.fixtures.models import sample

    _, lat, pos, neg = env
    kw.setdefault("cfg", 1.0)
    kw.setdefault("steps", 4)
    return sample(model, lat, pos, neg, noise_mask=noise_mask, **kw)


def test_dit_keep_is_exact_and_gradient_is_followed(tiny_dit):
    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion

    model, lat, _, _ = tiny_dit
    m, out = PlugKitDifferentialDiffusion.execute(model=model, samples={"samples": lat},
                                                  change_map=torch.zeros(1, 128, 128), schedule="step",
                                                  exact_keep=True).result
    assert (run(tiny_dit, m, out["noise_mask"]) - lat).abs().max().item() <= TOL

    m, out = PlugKitDifferentialDiffusion.execute(model=model, samples={"samples": lat},
                                                  change_map=cm.linear_gradient(128, 128),
                                                  map_convention="white=keep").result
    res = run(tiny_dit, m, out["noise_mask"])
    col = (res - lat).abs().mean(dim=(0, 1, 2))
    assert col[-4:].mean() < col[:4].mean() / 2  # white=keep: the right side (white) changes least
    assert col[:4].mean() > 1e-2


def test_dit_parity_with_core(tiny_dit, comfy_nodes):
    from plugkit.nodes.differential_diffusion.nodes import PlugKitDifferentialDiffusion

    model, lat, _, _ = tiny_dit
    change = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    m, out = PlugKitDifferentialDiffusion.execute(model=model, samples={"samples": lat}, change_map=change).result
    core = comfy_nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"].execute(model).result[0]
    mask = comfy_nodes.NODE_CLASS_MAPPINGS["SetLatentNoiseMask"]().set_mask({"samples": lat}, change)[0]["noise_mask"]
    assert (run(tiny_dit, m, out["noise_mask"]) - run(tiny_dit, core, mask)).abs().max().item() <= TOL
