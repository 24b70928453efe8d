"""PlugKit: FreeU, Diff-Plugin, Plug-and-Play and Differential Diffusion as ComfyUI nodes.

Importing this package has no side effects: the node classes (and ComfyUI's API) are imported
only when ComfyUI asks for them through ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import PlugKitExtension

    return PlugKitExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
