"""Differential Diffusion (Levin & Fried, exx8/differential-diffusion).

``NODES`` is resolved on first access (PEP 562), so the pure-torch math modules
(``mask_schedule``, ``change_map``) import without ComfyUI on the path.
"""


def __getattr__(name: str):
    if name == "NODES":
        from .nodes_differential_diffusion import PlugKitChangeMap, PlugKitDifferentialDiffusion

        nodes = [PlugKitDifferentialDiffusion, PlugKitChangeMap]
        globals()["NODES"] = nodes
        return nodes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
