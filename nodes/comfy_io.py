"""The one place the pack imports ComfyUI's node API; node modules import ``io``/``ui`` from here."""
from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
