"""PlugKitFreeU: FreeU (Si et al., CVPR 2024; ChenyangSi/FreeU, MIT) as a ComfyUI V3 node.

Glue only: checks the inputs, reads the model's family and channel layout, resolves presets, and
attaches one ``hooks.FreeUPatch`` to a clone of the model through ``hooks.attach`` (ComfyUI's
``set_model_output_block_patch`` hook plus two keyed wrappers; chaining rules in ``hooks``).
"""
from __future__ import annotations

import logging

from ..comfy_io import io
from ..node_errors import check_choice, check_finite, input_error
from .backbone_scaling import VERSIONS
from .hooks import APPLY_TO, NODE_ID, THRESHOLD_MODES, FreeUPatch, attach
from .presets import CUSTOM, PRESET_OPTIONS, native_latent, preset_version, resolve

log = logging.getLogger(__name__)

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


def unet_layout(model, other_models: str):
    """``model_layout``, or None (logged) for a model without a U-Net decoder under 'pass through'."""
    try:
        return model_layout(model)
    except NotAUNet as err:
        if other_models != OTHER_MODELS_PASS:
            raise
        log.warning("%s: %s; 'other_models' is 'pass through', so the model is handed on without FreeU.",
                    NODE_ID, err.family_text)
        return None


def check_inputs(b1, b2, s1, s2, version, start_percent, end_percent, threshold, other_models) -> int:
    """Refuse bad inputs (NaN passes ComfyUI's min/max) with the node's error; returns ``threshold`` as int."""
    for name, value in (("b1", b1), ("b2", b2), ("s1", s1), ("s2", s2)):
        check_finite(value, NODE_ID, name, "enter a factor such as 1.3 (1 = off)")
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= check_finite(value, NODE_ID, name, "enter a value from 0 to 1") <= 1.0:
            raise input_error(NODE_ID, name, f"must be between 0 and 1, got {value!r}")
    if isinstance(threshold, float) and threshold.is_integer():
        threshold = int(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise input_error(NODE_ID, "threshold", f"must be a whole number >= 1 (1 = the official 2x2 box), "
                                                f"got {threshold!r}")
    check_choice(version, VERSIONS, NODE_ID, "version")
    if start_percent > end_percent:
        raise input_error(NODE_ID, "start_percent", f"({start_percent}) is after 'end_percent' ({end_percent})",
                          "set start_percent <= end_percent (0 and 1 apply FreeU on every step)")
    check_choice(other_models, OTHER_MODELS, NODE_ID, "other_models")
    return threshold


def preset_settings(preset, b1, b2, s1, s2, version, names) -> tuple[tuple[float, float, float, float], str]:
    """((b1, b2, s1, s2), version) the node runs with: the preset's, logged, or the inputs for 'custom'."""
    values, source = resolve(preset, b1, b2, s1, s2, names)
    if source != CUSTOM:
        tuned = preset_version(source, version)
        if tuned != version:
            log.info("%s: preset %s was tuned with FreeU %s; running %s (version %s is ignored for it).",
                     NODE_ID, source, tuned, tuned, version)
            version = tuned
        log.info("%s: preset %s -> b1=%s b2=%s s1=%s s2=%s (%s)", NODE_ID, source, *values, version)
    return values, version


def sigma_range(m, start_percent: float, end_percent: float) -> tuple[float | None, float | None]:
    """The node's own (sigma_start, sigma_end) from the model's model_sampling; (None, None) = every step."""
    if start_percent <= 0.0 and end_percent >= 1.0:
        return None, None
    model_sampling = m.get_model_object("model_sampling")
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))


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
        threshold = check_inputs(b1, b2, s1, s2, version, start_percent, end_percent, threshold, other_models)
        layout = unet_layout(model, other_models)
        if layout is None:
            return io.NodeOutput(model)
        channels, names, v_pred = layout
        (b1, b2, s1, s2), version = preset_settings(preset, b1, b2, s1, s2, version, names)
        m = model.clone()
        sigma_start, sigma_end = sigma_range(m, start_percent, end_percent)
        attach(m, FreeUPatch(channels, b1, b2, s1, s2, version=version, threshold=threshold,
                             threshold_mode=threshold_mode, reference_latent=native_latent(names, v_pred),
                             apply_to=apply_to, start_percent=start_percent, end_percent=end_percent,
                             sigma_start=sigma_start, sigma_end=sigma_end))
        return io.NodeOutput(m)


NODES = [PlugKitFreeU]
