"""Model files (beyond the SD1.5 checkpoint) that shipped workflows need, generated for tests.

Each technique that needs extra model files has a generator; the server harness links what they
return into the server's ``models/`` folder ({relative path under models/: file or folder}).
"""
from __future__ import annotations

from pathlib import Path


def prepare_model_files() -> dict[str, Path]:
    from .models import ensure_random_sd15_checkpoint
    from .workflows_diff_plugin import prepare_models as diff_plugin_models
    from .workflows_freeu import SDXL_CHECKPOINT

    files: dict[str, Path] = {}
    files.update(diff_plugin_models())
    # No SDXL-sized random checkpoint fits the test machines: the random SD1.5 one stands in under
    # the SDXL workflow's file name, so that workflow opens and runs (as an SD1.5 graph) on that tier.
    files[f"checkpoints/{SDXL_CHECKPOINT}"] = ensure_random_sd15_checkpoint()
    return files
