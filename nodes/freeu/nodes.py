"""PlugKitFreeU: FreeU (Si et al., CVPR 2024; ChenyangSi/FreeU, MIT) as a ComfyUI V3 node.

Glue only: reads the model's family and channel layout, resolves presets, and attaches one
``FreeUPatch`` through ComfyUI's ``set_model_output_block_patch`` hook plus two keyed wrappers:
OUTER_SAMPLE prepares per-run state (the sigma range of the model actually sampled, and a reference to
the run's guider in the run's own model_options) and resets it; CALC_COND_BATCH tells the patch the
role (cond / uncond) of every conds index of that call, read from the guider's own conds.

Chaining: the FreeU node closest to the sampler wins. A PlugKitFreeU replaces any FreeU already on
its input model (an earlier PlugKitFreeU, or core FreeU / FreeU_V2) and logs what it replaced; a
core FreeU node placed after it makes this one stand aside for the run (logged).
"""
from __future__ import annotations

import logging
import math
import re
import weakref

from ..comfy_io import io
from .backbone_scaling import VERSIONS
from .hooks import APPLY_TO, ROLES_KEY, RUN_STATE_KEY, THRESHOLD_MODES, FreeUPatch, cond_roles
from .presets import CUSTOM, PRESET_OPTIONS, native_latent, preset_version, resolve

log = logging.getLogger(__name__)

NODE_ID = "PlugKitFreeU"
WRAPPER_KEY = "plugkit_freeu"
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
RUN_KEY = "plugkit_freeu_run"  # run-scoped transformer_options entry: {"guider": weakref, "warned": bool}


def is_core_freeu(patch) -> bool:
    """A core FreeU / FreeU_V2 output-block patch (a closure defined in comfy_extras/nodes_freelunch)."""
    module = getattr(patch, "__module__", "") or ""
    qualname = getattr(patch, "__qualname__", "") or ""
    # ComfyUI names extras modules by dotted name or by file path, depending on how they were loaded.
    return re.split(r"[./\\]", module)[-1] == "nodes_freelunch" and qualname.startswith("FreeU")


def _describe(patch) -> str:
    if getattr(patch, "plugkit_freeu", False):
        return "an earlier PlugKitFreeU"
    return "core " + getattr(patch, "__qualname__", "FreeU").split(".", 1)[0]


OTHER_MODELS_ERROR = "error"
OTHER_MODELS_PASS = "pass through"
OTHER_MODELS = (OTHER_MODELS_ERROR, OTHER_MODELS_PASS)


class NotAUNet(ValueError):
    """The model has no U-Net decoder; ``family_text`` names what it is."""

    def __init__(self, family_text: str, message: str):
        super().__init__(message)
        self.family_text = f"the input 'model' is a {family_text}, which has no U-Net decoder"


def model_layout(model) -> tuple[int, list[str], bool]:
    """(model_channels, config class names in MRO order, v-prediction) of a U-Net MODEL.

    Raises ValueError naming the family for models without a U-Net decoder (Flux, SD3, other DiTs).
    """
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    names = [c.__name__ for c in type(config).__mro__ if c.__name__ not in ("object", "BASE")] if config is not None else []
    unet_config = getattr(config, "unet_config", None) or {}
    diffusion_model = getattr(base, "diffusion_model", None)
    channels = unet_config.get("model_channels") if isinstance(unet_config, dict) else None
    if not isinstance(channels, int) or not hasattr(diffusion_model, "output_blocks"):
        family = names[0] if names else type(base).__name__ if base is not None else type(model).__name__
        arch = type(diffusion_model).__name__ if diffusion_model is not None else "unknown"
        raise NotAUNet(
            f"{family} model (diffusion model {arch})",
            f"{NODE_ID}: the input 'model' is a {family} model (diffusion model {arch}), which has no "
            f"U-Net decoder skip connections. FreeU rescales U-Net backbone and skip features, so it "
            f"works only with U-Net models (SD1.x, SD2.x, SDXL and its refiner, SVD and other SD-based "
            f"video U-Nets). Remove {NODE_ID} for this model, or set 'other_models' to 'pass through' to "
            f"hand such models on unchanged.")
    v_pred = getattr(getattr(base, "model_type", None), "name", "") == "V_PREDICTION"
    return channels, names, v_pred


def _freeu_outer_sample(executor, *args, **kwargs):
    """Per run: sigma range from the sampled model's own model_sampling; stand aside for a later FreeU."""
    guider = executor.class_obj
    patches = (guider.model_options.get("transformer_options", {}).get("patches", {})
               .get("output_block_patch", []))
    ours = [(i, p) for i, p in enumerate(patches) if getattr(p, "plugkit_freeu", False)]
    if not ours:
        return executor(*args, **kwargs)
    core_at = [i for i, p in enumerate(patches) if is_core_freeu(p)]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    states = {}
    for i, patch in ours:
        later_core = any(j > i for j in core_at)
        if later_core:
            log.warning("%s: a core FreeU node was applied after it on the same model; the later FreeU "
                        "wins, so %s is off for this run (no double application).", NODE_ID, NODE_ID)
        states[id(patch)] = patch.run_state(model_sampling, suppressed=later_core)
    # guider.model_options is this run's own clone (CFGGuider.sample): what is set here ends with the run.
    run_options = guider.model_options.setdefault("transformer_options", {})
    run_options[RUN_STATE_KEY] = states
    run_options[RUN_KEY] = {"guider": weakref.ref(guider),
                            "by_role": any(p.apply_to != "both" for _, p in ours), "warned": False}
    try:
        return executor(*args, **kwargs)
    finally:
        run_options.pop(RUN_KEY, None)
        run_options.pop(RUN_STATE_KEY, None)


def _freeu_calc_cond_batch(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """Hand the patch the role of every conds index of this call (see hooks.cond_roles)."""
    options = model_options.get("transformer_options")
    run = options.get(RUN_KEY) if isinstance(options, dict) else None
    guider = run["guider"]() if isinstance(run, dict) and run.get("guider") is not None else None
    if guider is None or not run.get("by_role"):
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    roles = cond_roles(conds, getattr(guider, "conds", None) or {}, getattr(guider, "original_conds", None))
    if not run["warned"] and any(r is None for c, r in zip(conds, roles) if c is not None):
        run["warned"] = True
        log.warning("%s: a model pass this run uses conditioning that is not the guider's own positive or "
                    "negative (%s); apply_to 'cond'/'uncond' leaves it unpatched (only 'both' patches it).",
                    NODE_ID, type(guider).__name__)
    previous = options.get(ROLES_KEY)
    options[ROLES_KEY] = roles
    try:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    finally:
        if previous is None:
            options.pop(ROLES_KEY, None)
        else:
            options[ROLES_KEY] = previous


def _finite(name: str, value, hint: str) -> float:
    """A float input as a finite float, or a ValueError naming the input (NaN passes ComfyUI's min/max)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{NODE_ID}: input '{name}' must be a finite number, got {value!r}; {hint}")
    return number


class PlugKitFreeU(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="FreeU (PlugKit)",
            category="PlugKit/FreeU",
            description="FreeU: boosts U-Net backbone features and damps the low frequencies of the "
                        "skip features in the first two decoder stages (Si et al., CVPR 2024).",
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model (SD1.x, SD2.x, SDXL, SVD...). DiTs such as Flux or SD3 are refused."),
                io.Float.Input("b1", default=1.3, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor of the deepest decoder stage (4x base channels). 1 = off. Ignored unless preset is 'custom'."),
                io.Float.Input("b2", default=1.4, min=0.0, max=10.0, step=0.01,
                               tooltip="Backbone factor of the next decoder stage (2x base channels). 1 = off. Ignored unless preset is 'custom'."),
                io.Float.Input("s1", default=0.9, min=0.0, max=10.0, step=0.01,
                               tooltip="Skip factor on the low frequencies of the deepest stage's skip features. 1 = off. Ignored unless preset is 'custom'."),
                io.Float.Input("s2", default=0.2, min=0.0, max=10.0, step=0.01,
                               tooltip="Skip factor on the low frequencies of the next stage's skip features. 1 = off. Ignored unless preset is 'custom'."),
                io.Combo.Input("version", options=list(VERSIONS), default="v2",
                               tooltip="v2: structure-related backbone factor (as core FreeU_V2). v1: constant factor (as core FreeU)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which FreeU starts (0 = first step), as in ControlNet's start_percent."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which FreeU stops (1 = last step). Steps outside the range run the plain model."),
                io.Combo.Input("preset", options=list(PRESET_OPTIONS), default=CUSTOM, optional=True,
                               tooltip="'custom' uses b1/b2/s1/s2 above; a named preset uses its values ('SDXL sweep' always runs v1, the version it was tuned with); 'auto' picks the published set of SD1.x, SD2.x or SDXL base and refuses other models (refiner, SVD, upscaler...)."),
                io.Int.Input("threshold", default=1, min=1, max=64, step=1, optional=True,
                             tooltip="Half-width of the low-frequency box scaled by s1/s2 (1 = the official 2x2 box)."),
                io.Combo.Input("threshold_mode", options=list(THRESHOLD_MODES), default="fixed", optional=True,
                               tooltip="'fixed': the box is 'threshold' bins at every size (official). 'resolution-aware': the box grows with the image so every resolution filters the band that 'threshold' filters at the model's native resolution."),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="both", optional=True,
                               tooltip="Apply FreeU to every model pass (both, official), or only to passes ComfyUI encodes as positive (cond) or negative (uncond): under DualCFGGuider cond2 counts as negative, PerpNeg's empty prompt and SAG's extra pass as uncond."),
                io.Combo.Input("other_models", options=list(OTHER_MODELS), default=OTHER_MODELS_ERROR, optional=True,
                               tooltip="What to do with a model that has no U-Net decoder (Flux, SD3 and other DiTs): 'error' stops the run and says so; 'pass through' hands the model on unchanged with a warning in the log, for workflows that switch model families."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FreeU attached (the input model is not modified).")],
        )

    @classmethod
    def execute(cls, model, b1, b2, s1, s2, version="v2", start_percent=0.0, end_percent=1.0,
                preset=CUSTOM, threshold=1, threshold_mode="fixed", apply_to="both",
                other_models=OTHER_MODELS_ERROR) -> io.NodeOutput:
        for name, value in (("b1", b1), ("b2", b2), ("s1", s1), ("s2", s2)):
            _finite(name, value, "enter a factor such as 1.3 (1 = off).")
        for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if not 0.0 <= _finite(name, value, "enter a value from 0 to 1.") <= 1.0:
                raise ValueError(f"{NODE_ID}: input '{name}' must be between 0 and 1, got {value!r}.")
        if isinstance(threshold, float) and threshold.is_integer():
            threshold = int(threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"{NODE_ID}: input 'threshold' must be a whole number >= 1 (1 = the official "
                             f"2x2 box), got {threshold!r}.")
        if version not in VERSIONS:
            raise ValueError(f"{NODE_ID}: input 'version' must be one of {', '.join(VERSIONS)}, got {version!r}.")
        if start_percent > end_percent:
            raise ValueError(f"{NODE_ID}: start_percent ({start_percent}) is after end_percent ({end_percent}); "
                             f"set start_percent <= end_percent (0 and 1 apply FreeU on every step).")
        if other_models not in OTHER_MODELS:
            raise ValueError(f"{NODE_ID}: input 'other_models' must be one of {', '.join(OTHER_MODELS)}, "
                             f"got {other_models!r}.")
        try:
            channels, names, v_pred = model_layout(model)
        except NotAUNet as err:
            if other_models != OTHER_MODELS_PASS:
                raise
            log.warning("%s: %s; 'other_models' is 'pass through', so the model is handed on without FreeU.",
                        NODE_ID, err.family_text)
            return io.NodeOutput(model)
        (b1, b2, s1, s2), source = resolve(preset, b1, b2, s1, s2, names)
        if source != CUSTOM:
            tuned = preset_version(source, version)
            if tuned != version:
                log.info("%s: preset %s was tuned with FreeU %s; running %s (version %s is ignored for it).",
                         NODE_ID, source, tuned, tuned, version)
                version = tuned
            log.info("%s: preset %s -> b1=%s b2=%s s1=%s s2=%s (%s)", NODE_ID, source, b1, b2, s1, s2, version)

        m = model.clone()
        sigma_start = sigma_end = None
        if not (start_percent <= 0.0 and end_percent >= 1.0):
            model_sampling = m.get_model_object("model_sampling")
            sigma_start = float(model_sampling.percent_to_sigma(start_percent))
            sigma_end = float(model_sampling.percent_to_sigma(end_percent))
        patch = FreeUPatch(channels, b1, b2, s1, s2, version=version, threshold=threshold,
                           threshold_mode=threshold_mode,
                           reference_latent=native_latent(names, v_pred),
                           apply_to=apply_to, start_percent=start_percent, end_percent=end_percent,
                           sigma_start=sigma_start, sigma_end=sigma_end)

        existing = m.model_options["transformer_options"].get("patches", {}).get("output_block_patch", [])
        if any(getattr(p, "plugkit_freeu", False) or is_core_freeu(p) for p in existing):
            kept, at, replaced = [], None, []
            for p in existing:
                if getattr(p, "plugkit_freeu", False) or is_core_freeu(p):
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
        for kind, wrapper in ((OUTER_SAMPLE, _freeu_outer_sample), (CALC_COND_BATCH, _freeu_calc_cond_batch)):
            m.remove_wrappers_with_key(kind, WRAPPER_KEY)
            m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
        return io.NodeOutput(m)


NODES = [PlugKitFreeU]
