"""Collects every technique's nodes into the ComfyExtension that ComfyUI loads."""
from __future__ import annotations

from .comfy_io import ComfyExtension, io
from . import differential_diffusion, diff_plugin, freeu, pnp, segmentation

TECHNIQUES = (freeu, diff_plugin, pnp, differential_diffusion, segmentation)


def all_nodes() -> list[type[io.ComfyNode]]:
    return [node for technique in TECHNIQUES for node in technique.NODES]


class PlugKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
