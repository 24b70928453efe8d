"""Diff-Plugin (Liu et al., CVPR 2024): Task-Plugins, the Plugin-Selector and plugin training.

Math and files (comfy-free, importable alone): ``task_plugin``, ``plugin_selector``, ``plugin_files``,
``plugin_training``, ``official_unipc``, ``official_resize``; the command line ``train_cli``. ComfyUI
side: ``hooks`` (what ComfyUI calls while sampling), ``runs`` (model runs), ``nodes`` (glue), imported
lazily so the math and the command-line tools import without ComfyUI's node API on the path.
"""


from ..lazy_nodes import node_list_getattr

__getattr__ = node_list_getattr(__name__)
