"""FreeU's published b1/b2/s1/s2 sets, and which model families they belong to.

Sources (see docs/freeu.md for links):
- SD1.4, SD1.5, SD2.1, SDXL: ChenyangSi/FreeU README, "Parameters" (the values that accompany the
  v2 structure-related scaling, updated 2023-10-18; SD2.1's older 1.1/1.2/0.9/0.2 is struck out).
- SDXL sweep (v1): b1 1.1, b2 1.2, s1 0.6, s2 0.4 -- the SDXL values of the diffusers FreeU guide,
  from the community W&B sweep (Nasir Khalid) that the FreeU README links. diffusers' FreeU scales the
  backbone by a constant factor, so the sweep tuned v1: this preset always runs with v1.

``auto`` picks a set only for the model families the authors published one for: the config classes
SD15 (SD1.x), SD20 (SD2.x) and SDXL (SDXL base). Every other U-Net family (refiner, SVD/SV3D, the x4
upscaler, Zero123, instruct-pix2pix, distilled SDXLs, ...) has no published set: ``auto`` refuses it
by name rather than pass another family's values off as published.

Pure python: the family is found from the names ComfyUI gives its model configs (passed in as strings).
"""
from __future__ import annotations

from ..node_errors import check_choice

CUSTOM = "custom"
AUTO = "auto"

PRESETS: dict[str, tuple[float, float, float, float]] = {
    "SD1.4": (1.3, 1.4, 0.9, 0.2),
    "SD1.5": (1.5, 1.6, 0.9, 0.2),
    "SD2.1": (1.4, 1.6, 0.9, 0.2),
    "SDXL": (1.3, 1.4, 0.9, 0.2),
    "SDXL sweep": (1.1, 1.2, 0.6, 0.4),
}

# The FreeU version a preset was tuned with, where it is not the user's choice (None: keep `version`).
PRESET_VERSIONS: dict[str, str | None] = {"SDXL sweep": "v1"}

PRESET_OPTIONS = [CUSTOM, AUTO, *PRESETS]

# The exact ComfyUI config class -> the published set `auto` gives it.
_PUBLISHED: dict[str, str] = {"SD15": "SD1.5", "SD20": "SD2.1", "SDXL": "SDXL"}

# ComfyUI model-config class name -> (native resolution in pixels as (H, W), VAE downscale factor).
_LAYOUTS: dict[str, tuple[tuple[int, int], int]] = {
    "SD15": ((512, 512), 8),
    "SD15_instructpix2pix": ((512, 512), 8),
    "SD20": ((768, 768), 8),  # 512 for the epsilon (base) variant: see native_resolution
    "SD21UnclipL": ((768, 768), 8),
    "SD21UnclipH": ((768, 768), 8),
    "LotusD": ((768, 768), 8),
    "Stable_Zero123": ((256, 256), 8),
    # Trained on 512x512 crops of the output image; its VAE downsamples by 4 (ComfyUI's
    # SD_4XUpscale_Conditioning makes a latent of output size // 4), so its native latent is 128x128.
    "SD_X4Upscaler": ((512, 512), 4),
    "SVD_img2vid": ((576, 1024), 8),
    "SV3D_u": ((576, 576), 8),
    "SV3D_p": ((576, 576), 8),
    "SDXL": ((1024, 1024), 8),
    "SDXLRefiner": ((1024, 1024), 8),
    "SDXL_instructpix2pix": ((1024, 1024), 8),
    "SSD1B": ((1024, 1024), 8),
    "Segmind_Vega": ((1024, 1024), 8),
    "KOALA_700M": ((1024, 1024), 8),
    "KOALA_1B": ((1024, 1024), 8),
}


def family_of(config_names: list[str]) -> str | None:
    """The published preset for a model, given its config class name first (then its bases).

    Only the exact class counts: a subclass (a refiner, an upscaler, a distilled SDXL) is another
    model with no published values, even where ComfyUI derives its config from SD20 or SDXL.
    """
    return _PUBLISHED.get(config_names[0]) if config_names else None


def _layout(config_names: list[str]):
    for name in config_names:
        if name in _LAYOUTS:
            return name, _LAYOUTS[name]
    return None, ((512, 512), 8)


def native_resolution(config_names: list[str], v_prediction: bool = False) -> tuple[int, int]:
    """The family's training resolution in pixels (H, W); 512x512 when unknown."""
    name, (size, _) = _layout(config_names)
    if name == "SD20" and not v_prediction:
        return (512, 512)  # SD2.x-base is an epsilon model trained at 512
    return size


def latent_factor(config_names: list[str]) -> int:
    """Pixels per latent cell of the family's VAE: 4 for the x4 upscaler, 8 for every other U-Net."""
    return _layout(config_names)[1][1]


def native_latent(config_names: list[str], v_prediction: bool = False) -> tuple[int, int]:
    """The latent (H, W) at the family's native resolution."""
    h, w = native_resolution(config_names, v_prediction)
    f = latent_factor(config_names)
    return h // f, w // f


def preset_version(preset: str, version: str) -> str:
    """The version a preset runs with: its own where it was tuned with one, else the user's."""
    return PRESET_VERSIONS.get(preset) or version


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
            model = config_names[0] if config_names else "unknown"
            raise ValueError(
                f"PlugKitFreeU: input 'preset': 'auto' found no published FreeU values for this model "
                f"({model}). FreeU's authors published values only for SD1.4/SD1.5, SD2.1 and SDXL base; "
                f"'auto' uses them only for those families (ComfyUI configs SD15, SD20, SDXL), not for "
                f"refiners, video, upscaler or other derived U-Nets. Pick a named preset to try its values "
                f"on this model anyway ({', '.join(PRESETS)}), or set preset to 'custom' and enter b1/b2/s1/s2.")
        return PRESETS[family], family
    check_choice(preset, PRESET_OPTIONS, "PlugKitFreeU", "preset")
    return PRESETS[preset], preset
