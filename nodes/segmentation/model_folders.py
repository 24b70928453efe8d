"""Where segmenters live: ``models/plugkit_segmenters`` (and its extra_model_paths.yaml entries),
listing, saving and loading by name (names stay inside the folder)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .segmenter import Segmenter, safe_child

log = logging.getLogger(__name__)

FOLDER = "plugkit_segmenters"


def segmenter_folders() -> list[str]:
    """Register ``models/plugkit_segmenters`` with folder_paths (idempotent, lazy, never at import)
    and return every folder configured for it (extra_model_paths.yaml entries included)."""
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    return folder_paths.get_folder_paths(FOLDER)


def list_segmenters() -> list[str]:
    found: set[str] = set()
    try:
        for base in segmenter_folders():
            base_path = Path(base)
            if base_path.is_dir():
                found.update(p.relative_to(base_path).as_posix() for p in base_path.rglob("*.safetensors"))
    except Exception as exc:  # listing must never break the node list
        log.warning("PlugKit segmentation: could not list models/%s: %s", FOLDER, exc)
    return sorted(found)


def save_segmenter(segmenter: Segmenter, name: str, overwrite: bool, node: str) -> Path:
    """Write ``segmenter`` as ``<first models/plugkit_segmenters folder>/<name>.safetensors``."""
    name = str(name).strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    base = segmenter_folders()[0]
    path = safe_child(base, name)
    if path is None:
        raise ValueError(f"{node}: input 'name' is {name!r}; use a plain name inside models/{FOLDER} "
                         "(letters, digits, '_', '-', optional sub-folders; no '..' or absolute paths).")
    if path.exists() and not overwrite:
        raise ValueError(f"{node}: '{name}' already exists in {base}; pick another name or enable 'overwrite'.")
    segmenter.save(path)
    log.info("%s: saved %r to %s", node, segmenter, path)
    return path


def load_segmenter(segmenter_name: str, node: str) -> Segmenter:
    """The segmenter saved as ``segmenter_name`` under any models/plugkit_segmenters folder."""
    for base in segmenter_folders():
        path = safe_child(base, str(segmenter_name))
        if path is None:
            raise ValueError(f"{node}: input 'segmenter_name' is {segmenter_name!r}; only names inside models/{FOLDER} "
                             "are accepted ('..' and absolute paths are refused).")
        if path.is_file():
            try:
                return Segmenter.load(path)
            except ValueError as exc:
                raise ValueError(f"{node}: input 'segmenter_name': {exc}; save segmenters with Save Segmenter.") from None
    raise ValueError(f"{node}: input 'segmenter_name': '{segmenter_name}' not found under models/{FOLDER} "
                     f"({', '.join(segmenter_folders())}); save one with Save Segmenter and refresh.")
