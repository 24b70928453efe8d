"""Workflow generation: the shipped UI-format workflows, their input pictures and thumbnails.

``python -m tools.workflows [technique ...]`` regenerates them with one server start (see
``__main__``). ``builder`` is the UI-format builder and the UI -> API conversion the tests use; each
technique's module (``freeu``, ``pnp``, ...) has ``workflows(info) -> {file name: Workflow}`` and,
where its workflows load pictures, ``write_images()``.
"""
