"""Test harness: the real ComfyUI host (tools.harness.host), the pack as package ``plugkit``, shared models.

Tiers: tests/<technique>/test_*_math.py import only torch and the pack's math modules; host tests
use the ``comfy`` fixture (real ComfyUI modules in-process); tests/e2e drives a real server.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # test-only: lets tests import tools.*

from tools.harness import host  # noqa: E402


host.register_pack()


def ensure_host() -> Path:
    """Put the ComfyUI host on sys.path and configure it for this machine (tests only)."""
    return host.setup_in_process()


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI host, importable in-process. Returns its path."""
    return ensure_host()


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's ``nodes`` module with core extras loaded (FreeU, DifferentialDiffusion, ...)."""
    import asyncio

    import nodes as comfy_nodes_module

    if "FreeU_V2" not in comfy_nodes_module.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_nodes_module.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return comfy_nodes_module


@pytest.fixture
def tiny_model(comfy):
    """A fresh tiny SD1.x-structured ModelPatcher (32 base channels, pass-through init)."""
    from tools.fixtures.models import build_model

    return build_model(seed=0)


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy):
    """Path of the deterministic random-weight full-size SD1.5 checkpoint (generated once)."""
    from tools.fixtures.models import ensure_random_sd15_checkpoint

    return ensure_random_sd15_checkpoint()


@pytest.fixture(scope="session")
def sd15_full(sd15_checkpoint):
    """(model, clip, vae) loaded from the random SD1.5 checkpoint by ComfyUI's own loader."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


def pytest_configure(config):
    logging.getLogger("PIL").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def server(tmp_path_factory, sd15_checkpoint):
    """The real ComfyUI server with PlugKit in custom_nodes and the random SD1.5 checkpoint."""
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.harness.server import ComfyServer
    from tools.fixtures.model_files import prepare_model_files

    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(base, checkpoints={CHECKPOINT_NAME: sd15_checkpoint},
                      model_files=prepare_model_files())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
