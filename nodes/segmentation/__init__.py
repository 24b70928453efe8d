"""Label-efficient segmentation from diffusion features (Baranchuk et al., ICLR 2022;
yandex-research/ddpm-segmentation).

Math (comfy-free, importable alone): ``pixel_classifier``, ``segmenter``. ComfyUI side: ``hooks``
(feature extraction) and ``nodes`` (glue), imported lazily so the math imports without ComfyUI.
"""


from ..lazy_nodes import node_list_getattr

__getattr__ = node_list_getattr(__name__)
