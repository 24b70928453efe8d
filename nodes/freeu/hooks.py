"""What ComfyUI calls while sampling with FreeU: the output-block patch and two keyed wrappers.

``FreeUPatch``: ComfyUI calls it before every decoder skip concat as ``patch(h, hsp,
transformer_options)`` and concatenates what it returns. ``attach`` puts it on a (cloned) model,
replacing any FreeU already there, with the wrappers: ``freeu_outer_sample`` (OUTER_SAMPLE) makes
the run object (``FreeURun``: the sigma range of the model actually sampled, a reference to the
run's guider) and keeps it in the run's own transformer_options for the run
(``run_state.run_scope``); ``freeu_calc_cond_batch`` (CALC_COND_BATCH) tells the patch the role
(cond / uncond) of every conds index of that call, read from the guider's own conds.

This module knows the shape of ``transformer_options`` (``sigmas``, ``cond_or_uncond``, ``uuids``,
``original_shape``), of a guider's ``conds`` and of a ModelPatcher's patch lists, but imports
nothing from ComfyUI, so it is tested directly.

cond / uncond by role: ``cond_or_uncond`` holds, per batch chunk, the chunk's index in the list of
conds the caller handed to ``calc_cond_batch``. That index means cond (0) / uncond (1) only for
``sampling_function``'s ``[positive, negative]``: DualCFGGuider passes ``[negative, middle, positive]``,
PerpNegGuider ``[positive, negative, empty]``, SAG's extra pass ``[negative]``. ``cond_roles`` maps
each index to its role from the guider's own conds (which list it is, else its cond uuids), and a
role is what ComfyUI encodes that cond as (``prompt_type``: the cond's own, else its key, as in
``samplers.encode_model_conds``): ``positive`` -> cond, ``negative`` -> uncond.

Stages are found by the backbone's channel count: ``4 * model_channels`` gets (b1, s1) and
``2 * model_channels`` gets (b2, s2) -- the official rule, valid for every SD-style U-Net.

Chaining: the FreeU node closest to the sampler wins. ``attach`` replaces any FreeU already on the
model (an earlier PlugKitFreeU, or core FreeU / FreeU_V2) and logs what it replaced; a core FreeU
node placed after it makes this one stand aside for the run (logged).
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field

import torch

from ..node_errors import check_choice
from ..run_state import run_scope, run_state
from .backbone_scaling import scale_backbone
from .fourier_filter import fourier_filter_any_device, resolution_threshold

log = logging.getLogger(__name__)

NODE_ID = "PlugKitFreeU"
APPLY_TO = ("both", "cond", "uncond")
THRESHOLD_MODES = ("fixed", "resolution-aware")
WRAPPER_KEY = "plugkit_freeu"
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
RUN_KEY = "plugkit_freeu_run"  # transformer_options key: this run's FreeURun (run_state.run_scope)
ROLES_KEY = "plugkit_freeu_roles"  # transformer_options key: role per calc_cond_batch conds index
_STANDARD_ROLES = ("cond", "uncond")  # sampling_function's [positive, negative]: used when no roles are given


def key_role(key: str, conds) -> str | None:
    """The role of a guider's conds list: what ComfyUI encodes it as (``prompt_type``, else the key)."""
    types = {c.get("prompt_type", key) if isinstance(c, dict) else key for c in (conds or [])} or {key}
    if types == {"positive"}:
        return "cond"
    if types == {"negative"}:
        return "uncond"
    return None


def cond_roles(conds: list, guider_conds: dict, original_conds: dict | None = None) -> list:
    """Role (``"cond"``, ``"uncond"`` or None = unknown) of each entry of a ``calc_cond_batch`` conds list.

    ``guider_conds``: the guider's processed conds by key (``guider.conds``) -- a list passed as is is
    recognised by identity. ``original_conds``: its conds before processing (``guider.original_conds``),
    whose explicit ``prompt_type`` decides the key's role. A list that is neither (a copy, a context
    window) is matched by cond uuids; a cond that is not the guider's own (the deprecated PerpNeg
    node's empty prompt) is unknown.
    """
    original_conds = original_conds or {}
    roles_by_key = {k: key_role(k, original_conds.get(k, v)) for k, v in guider_conds.items()}
    by_id = {id(v): k for k, v in guider_conds.items() if isinstance(v, list)}
    uuids_by_key = {k: {c.get("uuid") for c in v if isinstance(c, dict)} for k, v in guider_conds.items()
                    if isinstance(v, list)}
    roles = []
    for entry in conds:
        if entry is None:
            roles.append(None)
            continue
        key = by_id.get(id(entry))
        if key is None and entry:
            wanted = {c.get("uuid") for c in entry if isinstance(c, dict)}
            matches = [k for k, have in uuids_by_key.items() if None not in wanted and wanted <= have]
            key = matches[0] if len(matches) == 1 else None
        roles.append(roles_by_key.get(key))
    return roles


def chunk_role(code, roles) -> str | None:
    """Role of one batch chunk from its ``cond_or_uncond`` code (its index in the conds list)."""
    table = _STANDARD_ROLES if roles is None else roles
    return table[code] if isinstance(code, int) and 0 <= code < len(table) else None


@dataclass
class PatchRun:
    """One FreeU patch's state during one sampling run."""

    sigma_start: float | None
    sigma_end: float | None
    suppressed: bool = False  # a later FreeU patch takes over for this run
    seen_sigmas: "weakref.ref | None" = None  # the last step's sigmas tensor (answer cached per step)
    seen_active: bool = True


@dataclass
class FreeURun:
    """One sampling run's FreeU state, under RUN_KEY in the run's transformer_options."""

    patches: dict = field(default_factory=dict)  # id(FreeUPatch) -> PatchRun
    guider: "weakref.ref | None" = None  # the run's guider (its conds give calc_cond_batch's roles)
    by_role: bool = False  # some patch applies to cond or uncond only
    warned: bool = False  # the foreign-conditioning warning was logged this run


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
        check_choice(apply_to, APPLY_TO, NODE_ID, "apply_to")
        check_choice(threshold_mode, THRESHOLD_MODES, NODE_ID, "threshold_mode")
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
        self.sigma_start, self.sigma_end = sigma_start, sigma_end  # the node's own range (None = ungated)

    # Since ComfyUI 0.14 clones share this object: per-run state lives in the run's transformer_options
    # (a PatchRun in the FreeURun under RUN_KEY, made by freeu_outer_sample), never here.
    def patch_run(self, model_sampling=None, suppressed: bool = False) -> "PatchRun":
        """This patch's state for one run: the sigma range from the sampled model's model_sampling."""
        if model_sampling is not None and self.gated:
            return PatchRun(float(model_sampling.percent_to_sigma(self.start_percent)),
                            float(model_sampling.percent_to_sigma(self.end_percent)), suppressed)
        return PatchRun(self.sigma_start, self.sigma_end, suppressed)

    def __deepcopy__(self, memo):
        # Settings only (older ComfyUI deep-copies model_options on clone()).
        return FreeUPatch(self.model_channels, self.b1, self.b2, self.s1, self.s2, version=self.version,
                          threshold=self.threshold, threshold_mode=self.threshold_mode,
                          reference_latent=self.reference_latent, apply_to=self.apply_to,
                          start_percent=self.start_percent, end_percent=self.end_percent,
                          sigma_start=self.sigma_start, sigma_end=self.sigma_end)

    # -- gating -----------------------------------------------------------------------------------
    def is_active(self, transformer_options: dict) -> bool:
        """Whether this step is inside [start_percent, end_percent] (one host sync per step at most)."""
        run = run_state(transformer_options, RUN_KEY)
        state = run.patches.get(id(self)) if run is not None else None
        if state is None:  # called outside the node's wrapper: the node's own range, uncached
            state = PatchRun(self.sigma_start, self.sigma_end)
        if state.suppressed:
            return False
        if not self.gated or state.sigma_start is None or state.sigma_end is None:
            return True
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        seen = state.seen_sigmas() if state.seen_sigmas is not None else None
        if seen is sigmas:
            return state.seen_active
        sigma = float(sigmas.reshape(-1)[0])
        active = state.sigma_end <= sigma <= state.sigma_start
        state.seen_sigmas = weakref.ref(sigmas)
        state.seen_active = active
        return active

    def threshold_for(self, transformer_options: dict):
        if self.threshold_mode == "fixed":
            return self.threshold
        shape = transformer_options.get("original_shape")
        if not shape or len(shape) < 4:
            return self.threshold
        return resolution_threshold(self.threshold, (shape[-2], shape[-1]), self.reference_latent)

    # -- the patch ----------------------------------------------------------------------------------
    def __call__(self, h: torch.Tensor, hsp: torch.Tensor | None, transformer_options: dict):
        stage = self.stages.get(int(h.shape[1]))
        if stage is None or not self.is_active(transformer_options):
            return h, hsp
        b, s = stage
        if hsp is None:
            s = 1.0  # an earlier output-block patch consumed the skip: only the backbone is left to scale
        if b == 1.0 and s == 1.0:
            return h, hsp
        rows = self._rows(h.shape[0], transformer_options)
        if rows is None:
            return self._apply(h, hsp, b, s, transformer_options)
        if not rows:
            return h, hsp
        hsp_out = hsp.clone() if s != 1.0 else hsp
        for sl in rows:
            h_part, hsp_part = self._apply(h[sl], None if hsp is None else hsp[sl], b, s, transformer_options)
            if s != 1.0:
                hsp_out[sl] = hsp_part
        return h, hsp_out

    def _apply(self, h, hsp, b, s, transformer_options):
        scale_backbone(h, b, self.version)  # in place, as the reference does
        if s != 1.0:
            hsp = fourier_filter_any_device(hsp, self.threshold_for(transformer_options), s)
        return h, hsp

    def _rows(self, batch: int, transformer_options: dict):
        """None = every row; else the batch slices of the chunks whose role is ``apply_to``."""
        if self.apply_to == "both":
            return None
        codes = transformer_options.get("cond_or_uncond")
        if not codes or batch % len(codes) != 0:
            return None
        roles = transformer_options.get(ROLES_KEY)
        chosen = [chunk_role(c, roles) == self.apply_to for c in codes]
        if all(chosen):
            return None
        n = batch // len(codes)
        return [slice(i * n, (i + 1) * n) for i, keep in enumerate(chosen) if keep]


# -- chaining and the wrappers ----------------------------------------------------------------------
def is_core_freeu(patch) -> bool:
    """A core FreeU / FreeU_V2 output-block patch (a closure defined in comfy_extras/nodes_freelunch)."""
    module = getattr(patch, "__module__", "") or ""
    qualname = getattr(patch, "__qualname__", "") or ""
    # ComfyUI names extras modules by dotted name or by file path, depending on how they were loaded.
    return re.split(r"[./\\]", module)[-1] == "nodes_freelunch" and qualname.startswith("FreeU")


def _is_freeu(patch) -> bool:
    return getattr(patch, "plugkit_freeu", False) or is_core_freeu(patch)


def _describe(patch) -> str:
    if getattr(patch, "plugkit_freeu", False):
        return "an earlier PlugKitFreeU"
    return "core " + getattr(patch, "__qualname__", "FreeU").split(".", 1)[0]


def _output_block_patches(model_options: dict) -> list:
    return model_options.get("transformer_options", {}).get("patches", {}).get("output_block_patch", [])


def attach(m, patch: FreeUPatch) -> None:
    """Put ``patch`` on the cloned ModelPatcher ``m`` in place of any FreeU already there, and the wrappers."""
    existing = _output_block_patches(m.model_options)
    if any(_is_freeu(p) for p in existing):
        kept, at, replaced = [], None, []
        for p in existing:
            if _is_freeu(p):
                replaced.append(_describe(p))
                at = len(kept) if at is None else at
            else:
                kept.append(p)
        kept.insert(at, patch)
        m.model_options["transformer_options"]["patches"]["output_block_patch"] = kept
        log.warning("%s: the input model already had FreeU (%s); it is replaced by this node's "
                    "settings, not applied twice.", NODE_ID, ", ".join(replaced))
    else:
        m.set_model_output_block_patch(patch)
    for kind, wrapper in ((OUTER_SAMPLE, freeu_outer_sample), (CALC_COND_BATCH, freeu_calc_cond_batch)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)


def freeu_outer_sample(executor, *args, **kwargs):
    """Per run: sigma range from the sampled model's own model_sampling; stand aside for a later FreeU."""
    guider = executor.class_obj
    patches = _output_block_patches(guider.model_options)
    ours = [(i, p) for i, p in enumerate(patches) if getattr(p, "plugkit_freeu", False)]
    if not ours:
        return executor(*args, **kwargs)
    core_at = [i for i, p in enumerate(patches) if is_core_freeu(p)]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    run = FreeURun(guider=weakref.ref(guider), by_role=any(p.apply_to != "both" for _, p in ours))
    for i, patch in ours:
        later_core = any(j > i for j in core_at)
        if later_core:
            log.warning("%s: a core FreeU node was applied after it on the same model; the later FreeU "
                        "wins, so %s is off for this run (no double application).", NODE_ID, NODE_ID)
        run.patches[id(patch)] = patch.patch_run(model_sampling, suppressed=later_core)
    with run_scope(guider, RUN_KEY, run):
        return executor(*args, **kwargs)


def freeu_calc_cond_batch(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """Hand the patch the role of every conds index of this call (see cond_roles)."""
    run = run_state(model_options, RUN_KEY)
    guider = run.guider() if run is not None and run.guider is not None else None
    if guider is None or not run.by_role:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    roles = cond_roles(conds, getattr(guider, "conds", None) or {}, getattr(guider, "original_conds", None))
    if not run.warned and any(r is None for c, r in zip(conds, roles) if c is not None):
        run.warned = True
        log.warning("%s: a model pass this run uses conditioning that is not the guider's own positive or "
                    "negative (%s); apply_to 'cond'/'uncond' leaves it unpatched (only 'both' patches it).",
                    NODE_ID, type(guider).__name__)
    options = model_options["transformer_options"]
    previous = options.get(ROLES_KEY)
    options[ROLES_KEY] = roles
    try:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    finally:
        if previous is None:
            options.pop(ROLES_KEY, None)
        else:
            options[ROLES_KEY] = previous
