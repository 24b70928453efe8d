"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023; MichalGeyer/pnp-diffusers).

``NODES`` is resolved on first access (PEP 562), so the pure-torch math modules
(``ddim_inversion``, ``feature_pca``, ``pnp_source``) import without ComfyUI on the path.
"""


from ..lazy_nodes import node_list_getattr

__getattr__ = node_list_getattr(__name__)
