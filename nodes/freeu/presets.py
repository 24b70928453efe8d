"""FreeU's published b1/b2/s1/s2 sets, and which model families they belong to.

Sources (see docs/freeu.md for links):
- SD1.4, SD1.5, SD2.1, SDXL: ChenyangSi/FreeU README, "Parameters" (the values that accompany the
  v2 structure-related scaling, updated 2023-10-18; SD2.1's older 1.1/1.2/0.9/0.2 is struck out).
- SDXL sweep: b1 1.1, b2 1.2, s1 0.6, s2 0.4 -- the SDXL values of the diffusers FreeU guide, from the
  community W&B sweep (Nasir Khalid) that the FreeU README links.

Pure python: the family is found from the names ComfyUI gives its model configs (passed in as strings).
"""
from __future__ import annotations

CUSTOM = "custom"
AUTO = "auto"

PRESETS: dict[str, tuple[float, float, float, float]] = {
    "SD1.4": (1.3, 1.4, 0.9, 0.2),
    "SD1.5": (1.5, 1.6, 0.9, 0.2),
    "SD2.1": (1.4, 1.6, 0.9, 0.2),
    "SDXL": (1.3, 1.4, 0.9, 0.2),
    "SDXL sweep": (1.1, 1.2, 0.6, 0.4),
}

PRESET_OPTIONS = [CUSTOM, AUTO, *PRESETS]

# ComfyUI model-config class name -> (preset family, native resolution in pixels as (H, W)).
# SD1.4 and SD1.5 share one config class: `auto` picks the SD1.5 set for both.
_FAMILIES: dict[str, tuple[str, tuple[int, int]]] = {
    "SD15": ("SD1.5", (512, 512)),
    "SD15_instructpix2pix": ("SD1.5", (512, 512)),
    "SD20": ("SD2.1", (768, 768)),  # 512 for the epsilon (base) variant: see native_resolution
    "SD21UnclipL": ("SD2.1", (768, 768)),
    "SD21UnclipH": ("SD2.1", (768, 768)),
    "LotusD": ("SD2.1", (768, 768)),
    "Stable_Zero123": ("SD1.5", (256, 256)),
    "SD_X4Upscaler": ("SD2.1", (512, 512)),
    "SVD_img2vid": ("SD2.1", (576, 1024)),
    "SV3D_u": ("SD2.1", (576, 576)),
    "SV3D_p": ("SD2.1", (576, 576)),
    "SDXL": ("SDXL", (1024, 1024)),
    "SDXLRefiner": ("SDXL", (1024, 1024)),
    "SDXL_instructpix2pix": ("SDXL", (1024, 1024)),
    "SSD1B": ("SDXL", (1024, 1024)),
    "Segmind_Vega": ("SDXL", (1024, 1024)),
    "KOALA_700M": ("SDXL", (1024, 1024)),
    "KOALA_1B": ("SDXL", (1024, 1024)),
}


def family_of(config_names: list[str]) -> str | None:
    """Preset family for a model, given its config class name and its base classes' names (MRO order)."""
    for name in config_names:
        if name in _FAMILIES:
            return _FAMILIES[name][0]
    return None


def native_resolution(config_names: list[str], v_prediction: bool = False) -> tuple[int, int]:
    """The family's training resolution in pixels (H, W); 512x512 when unknown."""
    for name in config_names:
        if name in _FAMILIES:
            if name == "SD20" and not v_prediction:
                return (512, 512)  # SD2.x-base is an epsilon model trained at 512
            return _FAMILIES[name][1]
    return (512, 512)


def resolve(preset: str, b1: float, b2: float, s1: float, s2: float,
            config_names: list[str]) -> tuple[tuple[float, float, float, float], str]:
    """(b1, b2, s1, s2) for a preset choice, and a label saying where they came from.

    ``custom`` keeps the given values. ``auto`` picks by family and raises ValueError when the
    family has no published set.
    """
    if preset == CUSTOM:
        return (b1, b2, s1, s2), CUSTOM
    if preset == AUTO:
        family = family_of(config_names)
        if family is None:
            raise ValueError(
                f"PlugKitFreeU: preset 'auto' found no published FreeU values for the model family "
                f"{config_names[0] if config_names else 'unknown'!s}. Pick a preset by hand "
                f"({', '.join(PRESETS)}) or set preset to 'custom' and enter b1/b2/s1/s2.")
        return PRESETS[family], family
    if preset not in PRESETS:
        raise ValueError(f"PlugKitFreeU: unknown preset {preset!r}; choose one of {', '.join(PRESET_OPTIONS)}.")
    return PRESETS[preset], preset
