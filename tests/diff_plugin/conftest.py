"""Diff-Plugin fixtures."""
from __future__ import annotations

import pytest

from diff_plugin_testlib import write_released_plugin


@pytest.fixture
def released_plugin(tmp_path):
    return write_released_plugin(tmp_path, "derain", seed=0)


@pytest.fixture(scope="module")
def tiny_vae(comfy):
    """A real ``comfy.sd.VAE`` (SD's KL layout, 8x down, 4 latent channels, 32 base channels)."""
    from tools.fixtures.models import build_vae

    return build_vae(seed=0, channels=32)


@pytest.fixture(scope="module")
def tiny_clip_vision(comfy):
    """A real ``comfy.clip_vision.ClipVisionModel`` shaped like CLIP ViT-L/14 (224 px, 257 x 1024 tokens),
    2 encoder layers."""
    from tools.fixtures.models import build_clip_vision

    return build_clip_vision(seed=0, layers=2, intermediate=256)
