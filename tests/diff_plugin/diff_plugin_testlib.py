"""Diff-Plugin test helpers (imported by the tests): released-layout plugin folders with random weights."""
from __future__ import annotations

import math
from pathlib import Path

import torch

# The SCB config.json as released and the one writer of the released layout (the fixtures').
from tools.fixtures.diff_plugin_models import RELEASED_SCB_CONFIG  # noqa: F401 (the tests import it from here)
from tools.fixtures.diff_plugin_models import write_released_plugin as write_released_layout


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Dense random weights: every entry random (unlike tools.fixtures.models.random_init's plausible
    model, whose norms are 1 and biases 0), for parity and file-format tests."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        scale = 0.5 / math.sqrt(max(v[0].numel(), 1)) if v.ndim > 1 else 0.1
        out[k] = torch.randn(v.shape, generator=gen) * scale
    return out


def write_released_plugin(root: Path, task: str, seed: int = 0, module_prefix: bool = False,
                          config: dict | None = None) -> tuple[Path, dict, dict]:
    """<root>/<task>/ in the released layout with dense random weights (every weight, norms and biases
    too, so a key or mapping error shows); returns (folder, scb state, tpb state)."""
    from plugkit.nodes.diff_plugin.task_plugin import SpatialComplementBranch, TaskPromptBranch

    scb = random_state(SpatialComplementBranch(), seed)
    tpb = random_state(TaskPromptBranch(), seed + 1)
    folder = write_released_layout(root / task, scb, tpb, config=config, module_prefix=module_prefix)
    return folder, scb, tpb


def encode_pairs(model, clip_vision, vae, crops):
    """Every crop encoded at once, on the CPU, with the trainer's own encoder (``runs.make_encoder``);
    training streams instead. Small sets only."""
    from plugkit.nodes.diff_plugin.runs import make_encoder

    encode = make_encoder(model, clip_vision, vae, device="cpu")
    return [encode(name, degraded, clean) for name, degraded, clean in crops]


def read_pairs(pairs, resolution: int):
    """Read and centre-crop every usable pair at once (small sets only; training streams: ``PairStream``)."""
    from plugkit.nodes.diff_plugin import plugin_training as pt

    good, skipped = pt.check_pairs(pairs, resolution)
    out = [(d.stem, pt.resize_crop(pt.load_image(d), resolution), pt.resize_crop(pt.load_image(c), resolution))
           for d, c in good]
    return out, skipped


def save_selector(tuner, path):
    """A Plugin-Selector as a PlugKit .safetensors file (what ``plugin_files.load_selector`` reads besides the
    released .pt)."""
    from plugkit.nodes.diff_plugin import plugin_files as pf

    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tuner.state_dict().items()}
    return pf.atomic_save_safetensors(sd, {"format": pf.SELECTOR_FORMAT, "version": pf.FORMAT_VERSION}, path)
