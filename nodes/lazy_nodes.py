"""The one ``__getattr__`` every technique package uses for ``NODES`` (PEP 562): the node list is
imported from the technique's ``nodes`` module on first access, so its math modules import without
ComfyUI's node API on the path."""
from __future__ import annotations

import importlib


def node_list_getattr(package: str):
    def __getattr__(name: str):
        if name == "NODES":
            nodes = importlib.import_module(f"{package}.nodes").NODES
            setattr(importlib.import_module(package), "NODES", nodes)
            return nodes
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
