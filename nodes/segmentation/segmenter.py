"""The PLUGKIT_SEGMENTER value: the feature recipe, the class palette and the trained ensemble.

Pure torch (no ComfyUI import); saved as one ``.safetensors`` file (tensors + JSON metadata).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .pixel_classifier import PixelClassifier

FORMAT = "plugkit_segmenter"
VERSION = "1"

# The official recipe (experiments/*/ddpm.json): t = 50, 150, 250 of the 1000 DDPM steps, and
# output blocks 5, 6, 7, 8, 12 of guided-diffusion's 18-block decoder (6 levels of 3 blocks), whose
# outputs for a 256 px image are at 32, 32, 32, 64 and 128 px. SD's decoder has 3 blocks per level
# too and the same deepest grid for a 512 px image (8x8), so blocks 5-8 are the same positions
# with the same grids (32, 32, 32, 64 cells); the official block 12 (a level further up) has no
# counterpart, so we take the first block of the last level (9, 64 cells). SDXL (9 blocks, 3
# levels): the same rule from its 1/2-latent level gives 2, 3, 4, 5 and 6.
DEFAULT_STEPS = (50, 150, 250)
DEFAULT_BLOCKS = {12: (5, 6, 7, 8, 9), 9: (2, 3, 4, 5, 6)}


@dataclass
class Segmenter:
    family: str
    decoder_blocks: int
    latent_channels: int
    steps: tuple
    blocks: tuple
    block_channels: tuple  # channels of each captured block, in ``blocks`` order
    palette: list  # [(r, g, b)] per class
    classifiers: list  # [PixelClassifier]
    resolution: str = "latent"
    seed: int = 0
    conditioning: dict = field(default_factory=dict)  # {"c_crossattn": (1, T, C), "pooled_output": ...}
    source: str = "masks"

    @property
    def n_classes(self) -> int:
        return len(self.palette)

    @property
    def dim(self) -> int:
        return len(self.steps) * sum(self.block_channels)

    def __repr__(self) -> str:
        return (f"Segmenter({self.family}, {self.n_classes} classes, steps {list(self.steps)}, blocks "
                f"{list(self.blocks)}, {len(self.classifiers)} MLPs, dim {self.dim})")

    def check_model(self, family: str, decoder_blocks: int, latent_channels: int, node: str) -> None:
        if family != self.family or decoder_blocks != self.decoder_blocks:
            raise ValueError(
                f"{node}: input 'model' is a {family} U-Net ({decoder_blocks} decoder blocks) but the segmenter "
                f"was trained on {self.family} features ({self.decoder_blocks} decoder blocks); connect the "
                f"checkpoint it was trained with.")
        if latent_channels != self.latent_channels:
            raise ValueError(
                f"{node}: input 'vae' makes {latent_channels}-channel latents but the segmenter was trained on "
                f"{self.latent_channels}-channel latents; connect the VAE it was trained with.")

    # -- files -------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors: dict[str, torch.Tensor] = {}
        for k, m in enumerate(self.classifiers):
            for name, t in m.state_dict().items():
                tensors[f"member.{k}.{name}"] = t.detach().cpu().contiguous()
        for name, t in self.conditioning.items():
            if torch.is_tensor(t):
                tensors[f"cond.{name}"] = t.detach().float().cpu().contiguous()
        config = {
            "family": self.family, "decoder_blocks": self.decoder_blocks, "latent_channels": self.latent_channels,
            "steps": list(self.steps), "blocks": list(self.blocks), "block_channels": list(self.block_channels),
            "palette": [list(c) for c in self.palette], "members": len(self.classifiers),
            "resolution": self.resolution, "seed": self.seed, "source": self.source,
        }
        return tensors, {"format": FORMAT, "version": VERSION, "config": json.dumps(config)}

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temporary file in the same folder, then rename)."""
        import safetensors.torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        os.close(fd)
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Segmenter":
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"'{path.name}' is not a PlugKit segmenter (format {meta.get('format')!r})")
        cfg = json.loads(meta["config"])
        dim = len(cfg["steps"]) * sum(cfg["block_channels"])
        n_classes = len(cfg["palette"])
        members = []
        for k in range(int(cfg["members"])):
            prefix = f"member.{k}."
            sd = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            m = PixelClassifier(n_classes, dim)
            m.load_state_dict(sd, strict=True)
            members.append(m.eval())
        cond = {name[5:]: t for name, t in tensors.items() if name.startswith("cond.")}
        return cls(family=cfg["family"], decoder_blocks=int(cfg["decoder_blocks"]),
                   latent_channels=int(cfg["latent_channels"]), steps=tuple(cfg["steps"]), blocks=tuple(cfg["blocks"]),
                   block_channels=tuple(cfg["block_channels"]), palette=[tuple(c) for c in cfg["palette"]],
                   classifiers=members, resolution=cfg.get("resolution", "latent"), seed=int(cfg.get("seed", 0)),
                   conditioning=cond, source=cfg.get("source", "masks"))


def safe_child(base: str | os.PathLike, name: str) -> Optional[Path]:
    """``base/name`` if ``name`` is a relative path that stays inside ``base`` (no '..', no absolute
    path, no drive), else None."""
    if not name or os.path.isabs(name) or "\\" in name or ":" in name or "\x00" in name:
        return None
    parts = Path(name).parts
    if any(p in ("..", ".") for p in parts):
        return None
    base_path = Path(base).resolve()
    candidate = (base_path / name).resolve()
    try:
        candidate.relative_to(base_path)
    except ValueError:
        return None
    return candidate
