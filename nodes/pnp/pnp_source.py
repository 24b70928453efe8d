"""The PLUGKIT_PNP_SOURCE value: an inverted source image and what injection needs from it.

Pure torch (no ComfyUI import).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .ddim_inversion import SourceTrajectory


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into the hash ``h``."""
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


@dataclass
class SourceCache:
    """The source branch's injected tensors, computed once per source, schedule, prompt and model.

    ``key``: what the tensors depend on (the source's trajectory and prompt digest, the model's
    identity and patches, the storage device); a run with another key starts a new cache (one per
    source: memory stays bounded by one source's windows). ``steps``: for each sigma of the schedule
    (a float), a dict ``layer -> tensor`` with ``("features", block)`` -> the block's residual
    features (source rows, C, H, W) and ``("q", block, index)`` / ``("k", block, index)`` -> the
    self-attention queries / keys (source rows, tokens, channels), in the model's compute dtype.
    ``refs`` keeps the objects whose identity is in the key alive (so an id is never reused).
    """

    key: Any = None
    refs: tuple = ()
    on_cpu: bool = False
    steps: dict = field(default_factory=dict)

    def reset(self, key, refs: tuple = (), on_cpu: bool = False) -> bool:
        """Use ``key``; drops the tensors when it differs from the current one. True when kept."""
        if self.key == key and self.key is not None:
            return True
        self.key, self.refs, self.on_cpu, self.steps = key, tuple(refs), bool(on_cpu), {}
        return False

    def lookup(self, sigma: float, needed) -> Optional[dict]:
        """The tensors at ``sigma`` when every layer in ``needed`` is there, else None."""
        entry = self.steps.get(float(sigma))
        if entry is None or any(k not in entry for k in needed):
            return None
        return entry

    def store(self, sigma: float, record: dict) -> None:
        """Keep ``record`` (layer -> tensor) at ``sigma`` (detached; on the CPU when ``on_cpu``)."""
        entry = self.steps.setdefault(float(sigma), {})
        for k, t in record.items():
            t = t.detach()
            entry[k] = t.to("cpu", copy=True) if self.on_cpu else t.clone()  # compact: never a view of the batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.steps.values() for t in e.values())

    def dtypes(self) -> list:
        return sorted({str(t.dtype).removeprefix("torch.") for e in self.steps.values() for t in e.values()})


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
