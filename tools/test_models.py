"""Model files (beyond the SD1.5 checkpoint) that shipped workflows need, generated for tests.

Each technique that needs extra model files registers a generator here; the server harness links
what they return into the server's ``models/`` folder ({relative path under models/: file}).
"""
from __future__ import annotations

from pathlib import Path


def prepare_model_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    return files
