"""FreeU (Si et al., arXiv 2309.11497).

Math (comfy-free, importable alone): ``fourier_filter``, ``backbone_scaling``, ``presets``. What
ComfyUI calls while sampling (the output-block patch and the keyed wrappers, comfy-free too):
``hooks``. Node glue: ``nodes`` (imported lazily, so the math imports without ComfyUI).
"""


from ..lazy_nodes import node_list_getattr

__getattr__ = node_list_getattr(__name__)
