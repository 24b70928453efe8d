"""The PLUGKIT_PNP_SOURCE value: an inverted source image and what injection needs from it.

Pure torch (no ComfyUI import).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .ddim_inversion import SourceTrajectory
from .source_cache import SourceCache


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into the hash ``h``."""
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


@dataclass
class PnPSource:
    """Output of PlugKitPnPInvert.

    - ``trajectory``: source latents (sampler space, CPU float32) at the sampling schedule's sigmas.
    - ``model_kwargs``: the U-Net inputs ComfyUI built from the inversion prompt (``c_crossattn``,
      SDXL's ``y``, ...), one row per source item, captured during inversion (CPU).
    - ``conditioning``: the inversion CONDITIONING itself (PlugKitFeatureMap re-runs the model).
    - ``family``: ComfyUI's model config class (SD15, SD20, SDXL, ...); ``decoder_blocks``: number of
      U-Net decoder blocks; ``latent_shape``: (batch, channels, height, width) of the source.
    """

    trajectory: SourceTrajectory
    model_kwargs: dict
    conditioning: Any
    family: str
    decoder_blocks: int
    scheduler: str
    steps: int
    inversion_steps: int
    extra: dict = field(default_factory=dict)
    # not an __init__ field: dataclasses.replace() gives the copy its own empty cache
    cache: SourceCache = field(default_factory=SourceCache, init=False, repr=False, compare=False)

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.trajectory.shape)

    def __repr__(self) -> str:
        return (f"PnPSource(family={self.family}, latent={self.latent_shape}, scheduler={self.scheduler}, "
                f"steps={self.steps}, inversion_steps={self.inversion_steps})")

    def nbytes(self) -> int:
        n = self.trajectory.nbytes()
        for v in self.model_kwargs.values():
            if torch.is_tensor(v):
                n += v.numel() * v.element_size()
        return n

    def digest(self) -> str:
        """A digest of what the source branch is computed from: sigmas, latents and prompt inputs."""
        h = hashlib.sha1()
        tensor_digest(h, self.trajectory.sigmas)
        tensor_digest(h, self.trajectory.latents)
        for k in sorted(self.model_kwargs):
            v = self.model_kwargs[k]
            h.update(k.encode())
            if torch.is_tensor(v):
                tensor_digest(h, v)
            else:
                h.update(repr(v).encode())
        return h.hexdigest()

    def check_family(self, family: str, node: str) -> None:
        if family != self.family:
            raise ValueError(
                f"{node}: 'pnp_source' was inverted with a {self.family} model but 'model' is a {family} "
                f"model; invert the source with the same checkpoint family you sample with."
            )

    def check_run(self, noise_shape: tuple, node: str) -> None:
        """Raise a clear error when a sampling run's latent does not fit the source."""
        src = self.latent_shape
        if len(noise_shape) != len(src) or tuple(noise_shape[1:]) != tuple(src[1:]):
            def size(s):
                return f"{s[-1]}x{s[-2]} latent ({s[-1] * 8}x{s[-2] * 8} px), {s[1]} channels" if len(s) == 4 else str(s)
            raise ValueError(
                f"{node}: the sampler's latent is a {size(tuple(noise_shape))} but 'pnp_source' was inverted "
                f"from a {size(src)}; sample the LATENT output of PlugKitPnPInvert (same size as the source)."
            )
        b, s = noise_shape[0], src[0]
        if s != 1 and b != s:
            raise ValueError(
                f"{node}: the sampler's batch is {b} but 'pnp_source' holds {s} images; use a source of one "
                f"image (shared by the whole batch) or the same batch size."
            )
