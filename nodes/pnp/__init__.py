"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023; MichalGeyer/pnp-diffusers).

``NODES`` is resolved on first access (PEP 562), so the pure-torch math modules
(``ddim_inversion``, ``feature_pca``, ``pnp_source``) import without ComfyUI on the path.
"""


def __getattr__(name: str):
    if name == "NODES":
        from .nodes_pnp import PlugKitFeatureMap, PlugKitPnPInject, PlugKitPnPInvert

        nodes = [PlugKitPnPInvert, PlugKitPnPInject, PlugKitFeatureMap]
        globals()["NODES"] = nodes
        return nodes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
