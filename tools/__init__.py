"""PlugKit's development tooling (a git clone has it; the registry package does not: .comfyignore).
Nothing here is imported by ComfyUI. Grouped by role:

- commands users run: ``setup.sh`` (``make setup``), ``demo.py`` (``make demo``), ``bench/``
  (``make bench``: the runner in ``bench/__init__.py``, one module per technique), ``gpu_check.sh``;
- ``harness/``: ComfyUI as the tests and commands run it: ``host`` (find or unpack the host, load it
  in-process with the pack registered as ``plugkit``) and ``server`` (a real ``main.py`` server);
- ``fixtures/``: deterministic random-weight models built with ComfyUI's own classes (``models``)
  and the model files the shipped workflows name (``model_files``);
- ``workflows/``: generation of the shipped workflows, ``python -m tools.workflows [technique ...]``
  (one server start), the UI-format ``builder`` and the thumbnails;
- ``node_docs/``: the README node reference and the Chinese locale and help pages, generated from
  the node schemas.
"""
