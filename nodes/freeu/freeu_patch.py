"""The output-block patch that applies FreeU inside a ComfyUI U-Net, as a small callable object.

ComfyUI calls it before every decoder skip concat as ``patch(h, hsp, transformer_options)`` and
concatenates what it returns. This module knows the shape of ``transformer_options`` (``sigmas``,
``cond_or_uncond``, ``original_shape``) but imports nothing from ComfyUI, so it is tested directly.

Stages are found by the backbone's channel count: ``4 * model_channels`` gets (b1, s1) and
``2 * model_channels`` gets (b2, s2) -- the official rule, valid for every SD-style U-Net.
"""
from __future__ import annotations

import weakref

import torch

from .backbone_scaling import scale_backbone
from .fourier_filter import fourier_filter_any_device, resolution_threshold

APPLY_TO = ("both", "cond", "uncond")
THRESHOLD_MODES = ("fixed", "resolution-aware")
_WANT = {"cond": 0, "uncond": 1}  # ComfyUI's cond_or_uncond codes


class FreeUPatch:
    """FreeU for one model: ``(h, hsp) -> (h', hsp')`` on the matching decoder stages.

    ``sigma_start``/``sigma_end``: the step runs FreeU only while ``sigma_end <= sigma <= sigma_start``
    (ComfyUI's start/end-percent convention; None = no gating). Outside that range, and on stages
    FreeU does not touch, the call returns its inputs untouched before any tensor work.
    """

    plugkit_freeu = True  # marker: lets a later PlugKitFreeU find and replace this patch

    def __init__(self, model_channels: int, b1: float, b2: float, s1: float, s2: float, *,
                 version: str = "v2", threshold: int = 1, threshold_mode: str = "fixed",
                 reference_latent: tuple[int, int] = (64, 64), apply_to: str = "both",
                 start_percent: float = 0.0, end_percent: float = 1.0,
                 sigma_start: float | None = None, sigma_end: float | None = None):
        if apply_to not in APPLY_TO:
            raise ValueError(f"PlugKitFreeU: apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"PlugKitFreeU: threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        self.model_channels = int(model_channels)
        self.b1, self.b2, self.s1, self.s2 = float(b1), float(b2), float(s1), float(s2)
        self.version = version
        self.threshold = int(threshold)
        self.threshold_mode = threshold_mode
        self.reference_latent = tuple(reference_latent)
        self.apply_to = apply_to
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.stages = {self.model_channels * 4: (self.b1, self.s1), self.model_channels * 2: (self.b2, self.s2)}
        self.gated = not (self.start_percent <= 0.0 and self.end_percent >= 1.0)
        self.set_sigma_range(sigma_start, sigma_end)
        self.suppressed = False  # set for one run when a later FreeU patch takes over
        self._node_range = (self.sigma_start, self.sigma_end)

    # -- per-run state (prepared and reset by the node's OUTER_SAMPLE wrapper) ---------------------
    def set_sigma_range(self, sigma_start: float | None, sigma_end: float | None) -> None:
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self._seen_sigmas = None  # weakref to the last step's sigmas tensor
        self._seen_active = True

    def begin_run(self, model_sampling=None, suppressed: bool = False) -> None:
        if model_sampling is not None and self.gated:
            self.set_sigma_range(float(model_sampling.percent_to_sigma(self.start_percent)),
                                 float(model_sampling.percent_to_sigma(self.end_percent)))
        self.suppressed = suppressed

    def end_run(self) -> None:
        self.set_sigma_range(*self._node_range)
        self.suppressed = False

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: copy the settings, never per-run state.
        return FreeUPatch(self.model_channels, self.b1, self.b2, self.s1, self.s2, version=self.version,
                          threshold=self.threshold, threshold_mode=self.threshold_mode,
                          reference_latent=self.reference_latent, apply_to=self.apply_to,
                          start_percent=self.start_percent, end_percent=self.end_percent,
                          sigma_start=self._node_range[0], sigma_end=self._node_range[1])

    # -- gating -----------------------------------------------------------------------------------
    def is_active(self, transformer_options: dict) -> bool:
        """Whether this step is inside [start_percent, end_percent] (one host sync per step at most)."""
        if self.suppressed:
            return False
        if not self.gated or self.sigma_start is None or self.sigma_end is None:
            return True
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        seen = self._seen_sigmas() if self._seen_sigmas is not None else None
        if seen is sigmas:
            return self._seen_active
        sigma = float(sigmas.reshape(-1)[0])
        active = self.sigma_end <= sigma <= self.sigma_start
        self._seen_sigmas = weakref.ref(sigmas)
        self._seen_active = active
        return active

    def threshold_for(self, transformer_options: dict):
        if self.threshold_mode == "fixed":
            return self.threshold
        shape = transformer_options.get("original_shape")
        if not shape or len(shape) < 4:
            return self.threshold
        return resolution_threshold(self.threshold, (shape[-2], shape[-1]), self.reference_latent)

    # -- the patch ----------------------------------------------------------------------------------
    def __call__(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        stage = self.stages.get(int(h.shape[1]))
        if stage is None or not self.is_active(transformer_options):
            return h, hsp
        b, s = stage
        if b == 1.0 and s == 1.0:
            return h, hsp
        rows = self._rows(h.shape[0], transformer_options)
        if rows is None:
            return self._apply(h, hsp, b, s, transformer_options)
        if not rows:
            return h, hsp
        hsp_out = hsp.clone() if s != 1.0 else hsp
        for sl in rows:
            h_part, hsp_part = self._apply(h[sl], hsp[sl], b, s, transformer_options)
            if s != 1.0:
                hsp_out[sl] = hsp_part
        return h, hsp_out

    def _apply(self, h, hsp, b, s, transformer_options):
        scale_backbone(h, b, self.version)  # in place, as the reference does
        if s != 1.0:
            hsp = fourier_filter_any_device(hsp, self.threshold_for(transformer_options), s)
        return h, hsp

    def _rows(self, batch: int, transformer_options: dict):
        """None = every row; else the batch slices of the chunks FreeU applies to (cond/uncond)."""
        if self.apply_to == "both":
            return None
        codes = transformer_options.get("cond_or_uncond")
        if not codes or batch % len(codes) != 0:
            return None
        want = _WANT[self.apply_to]
        if all(c == want for c in codes):
            return None
        n = batch // len(codes)
        return [slice(i * n, (i + 1) * n) for i, c in enumerate(codes) if c == want]
