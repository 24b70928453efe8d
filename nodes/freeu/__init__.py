"""FreeU (Si et al., arXiv 2309.11497).

Math (comfy-free, importable alone): ``fourier_filter``, ``backbone_scaling``, ``presets``,
``freeu_patch``. Node glue: ``freeu_node`` (imported lazily, so the math imports without ComfyUI).
"""


def __getattr__(name):
    if name == "NODES":
        from .freeu_node import PlugKitFreeU

        return [PlugKitFreeU]
    raise AttributeError(name)
