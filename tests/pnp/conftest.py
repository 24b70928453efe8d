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
    from tools.models import build_model, random_conditioning

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
    from plugkit.nodes.pnp.nodes_pnp import PlugKitPnPInvert

    src, inv = PlugKitPnPInvert.execute(model=model, samples={"samples": latent}, conditioning=env["source_cond"],
                                        steps=5, inversion_steps=5).result
    env["source"], env["inverted"] = src, inv
    torch.set_num_threads(before)
    return env
