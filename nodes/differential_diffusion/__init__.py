"""Differential Diffusion (Levin & Fried, exx8/differential-diffusion).

Math (comfy-free, importable alone): ``mask_schedule``, ``change_map``. Node glue: ``nodes``
(imported lazily, PEP 562, so the pure-torch math modules import without ComfyUI on the path).
"""


from ..lazy_nodes import node_list_getattr

__getattr__ = node_list_getattr(__name__)
