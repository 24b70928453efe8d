"""``models/diff_plugin``: the folder registered with ComfyUI's folder_paths, the names its scan lists,
resolving a listed name to its path, the fingerprints that re-run a loader when a file changes, and the
training output path. The file formats and the bounded scan itself are in plugin_files.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import plugin_files

log = logging.getLogger(__name__)

FOLDER = "diff_plugin"


def plugin_folders() -> list[str]:
    """Register ``models/diff_plugin`` with folder_paths (idempotent; called lazily, never at import)
    and return every folder configured for it (extra_model_paths.yaml entries included)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    return folder_paths.get_folder_paths(FOLDER)


def scan_folder() -> tuple[list[str], list[str]]:
    """(plugin names, selector names) under every diff_plugin folder, as relative posix paths (a bounded
    scan that never goes round a link loop: plugin_files.scan_plugin_folders)."""
    scan = plugin_files.scan_plugin_folders(plugin_folders())
    return scan.plugins, scan.selectors


def resolve(name: str, node: str, what: str) -> Path:
    """The plugin or selector ``name`` as the folder scan lists it. Any other name (missing, absolute, with
    '..', not a plugin) gets the same error, so a prompt can neither load nor probe other files."""
    path = plugin_files.resolve_name(name, plugin_folders(), what)
    if path is not None:
        return path
    raise ValueError(
        f"{node}: input '{what}_name': {what} {name!r} not found under models/{FOLDER} ({', '.join(plugin_folders())}). "
        "Put the released plugin folders (e.g. derain/ with scb/ and tpb.pt) or .safetensors plugins there, "
        "refresh (R) and pick one from the list."
    )


def options(kind: int) -> list[str]:
    """The combo options: plugin names (``kind`` 0) or selector names (1); empty when the folder cannot be listed."""
    try:
        found = scan_folder()[kind]
    except Exception as exc:  # listing must never break the node list
        log.warning("Diff-Plugin: could not list models/%s: %s", FOLDER, exc)
        found = []
    return found


def path_fingerprint(path: Path) -> tuple:
    """(name, size, mtime_ns, inode) of a file, or of every file below a folder: changes when a plugin is
    rewritten under the same name (training saves atomically: a new file)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append((f.as_posix(), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def name_fingerprint(name: str, node: str, what: str):
    try:
        return path_fingerprint(resolve(name, node, what))
    except (OSError, ValueError):
        return ("missing", name)  # execute() reports the error


def output_path(plugin_name: str, node: str) -> Path:
    """models/diff_plugin/<plugin_name>.safetensors (in the first registered folder); a name that is absolute,
    climbs out with '..' or leads through a link out of the folder is refused. Creates only the folder."""
    parts = plugin_files.safe_relative_name(plugin_name.strip() if isinstance(plugin_name, str) else plugin_name)
    if parts is None:
        raise ValueError(f"{node}: input 'plugin_name' must be a relative file name such as 'my_derain', got {plugin_name!r}.")
    if not parts[-1].endswith(".safetensors"):
        parts = (*parts[:-1], parts[-1] + ".safetensors")
    base = Path(plugin_folders()[0])
    path = base.joinpath(*parts)
    base.mkdir(parents=True, exist_ok=True)
    base_real = os.path.realpath(base)
    # the file (if it exists) and the deepest existing folder on its way must lie inside the base (no link out)
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    inside = os.path.realpath(existing) == base_real or plugin_files.is_inside(os.path.realpath(existing), base_real)
    if not inside or (os.path.lexists(path) and not plugin_files.is_inside(os.path.realpath(path), base_real)):
        raise ValueError(f"{node}: input 'plugin_name' must name a file inside models/{FOLDER}, got {plugin_name!r}.")
    return path
