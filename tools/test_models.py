"""Model files (beyond the SD1.5 checkpoint) that shipped workflows need, generated for tests.

Each technique that needs extra model files has a generator; the server harness links what they
return into the server's ``models/`` folder ({relative path under models/: file or folder}).
"""
from __future__ import annotations

from pathlib import Path


def prepare_model_files() -> dict[str, Path]:
    from .workflows_diff_plugin import prepare_models as diff_plugin_models

    files: dict[str, Path] = {}
    files.update(diff_plugin_models())
    return files
