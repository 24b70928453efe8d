"""Label-efficient segmentation from diffusion features (Baranchuk et al., ICLR 2022;
yandex-research/ddpm-segmentation).

Math (comfy-free, importable alone): ``pixel_classifier``, ``segmenter``. ComfyUI side: ``hooks``
(feature extraction) and ``nodes`` (glue), imported lazily so the math imports without ComfyUI.
"""


def __getattr__(name: str):
    if name == "NODES":
        from .nodes import NODES

        globals()["NODES"] = NODES
        return NODES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
