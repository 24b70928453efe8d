"""Shared fixtures for the Differential Diffusion host tests (one tiny model per module: the nodes
clone it and never modify it, and the machine is slow)."""
import pytest
import torch


@pytest.fixture(scope="module")
def dd_env(comfy):
    from tools.fixtures.models import build_model, random_conditioning

    gen = torch.Generator().manual_seed(7)
    latent = torch.randn(1, 4, 16, 16, generator=gen) * 4.0
    return build_model(seed=0), latent, random_conditioning(seed=1), random_conditioning(seed=2)
