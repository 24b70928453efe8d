"""Diff-Plugin (Liu et al., CVPR 2024): Task-Plugins, the Plugin-Selector and plugin training.

``NODES`` is resolved on first access (PEP 562), so the pure-torch modules (``task_plugin``,
``plugin_selector``, ``plugin_files``, ``plugin_training``) and the command-line tools import
without ComfyUI's node API on the path.
"""


def __getattr__(name: str):
    if name == "NODES":
        from .plugin_nodes import NODES as plugin_nodes
        from .train_nodes import NODES as train_nodes

        nodes = [*plugin_nodes, *train_nodes]
        globals()["NODES"] = nodes
        return nodes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
