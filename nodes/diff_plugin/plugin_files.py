"""Reading and writing Task-Plugin and Plugin-Selector files (no ComfyUI import).

Formats read:
- The released layout (yuhaoliu7456/Diff-Plugin ``pre-trained/<task>/``): ``scb/config.json`` +
  ``scb/diffusion_pytorch_model.bin`` (or ``.safetensors``) with diffusers key names, and ``tpb.pt``
  = ``{'model': state_dict}`` whose keys may carry a ``module.`` (DataParallel) prefix.
- PlugKit's single file ``<name>.safetensors``: keys ``tpb.<key>`` and ``scb.<key>`` and metadata
  ``format = plugkit.diff_plugin.task_plugin``, ``task``, ``start`` (``input`` or ``noise``).
- The released selector ``plugin_selector/PromptTunner.pt`` (``{'model': {proj_v.*, proj_t.*,
  logit_scale}}``) or a safetensors file with the same keys.

Pickled files are read with ``torch.load(weights_only=True)`` only: no code from a checkpoint runs.
Every key set is checked strictly; errors name the file and the fix.

Finding files (``scan_plugin_folders``, ``resolve_name``): a node accepts only a name the scan of the
registered folders lists; anything else (an absolute path, ``..``, a file that is no plugin) resolves
to nothing, exactly like a missing file, so a prompt can neither load nor probe other files. The scan
enters each real folder at most once and stops at ``MAX_SCAN_DEPTH`` levels and ``MAX_SCAN_DIRS``
folders, so a symlink loop cannot stall the server.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from .plugin_selector import PromptTuner
from .task_plugin import NOISE_START_TASKS, TaskPlugin

log = logging.getLogger(__name__)

PLUGIN_FORMAT = "plugkit.diff_plugin.task_plugin"
SELECTOR_FORMAT = "plugkit.diff_plugin.selector"
FORMAT_VERSION = "1"
SCB_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MAX_SCAN_DEPTH = 8  # folder levels below a registered folder (the released layout needs 2)
MAX_SCAN_DIRS = 4096  # folders visited per scan, all registered folders together

# What the released SCB config must say for our fixed architecture to be the right one.
SCB_CONFIG_REQUIRED = {
    "in_channels": 4,
    "block_out_channels": [320],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "only_cross_attention": False,
}


class PluginFileError(ValueError):
    """A plugin or selector file that cannot be used; the message names the file and the fix."""


def is_released_plugin_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "tpb.pt").is_file() and (path / "scb" / "config.json").is_file()


def _torch_load(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle that needs code to run
        raise PluginFileError(
            f"Diff-Plugin: cannot read '{path}' ({type(exc).__name__}: {exc}). The file is corrupt, truncated "
            "or not a plain weights file (only weights are loaded, never code); download it again."
        ) from exc


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise PluginFileError(
            f"Diff-Plugin: cannot read '{path}' ({type(exc).__name__}: {exc}). The file is corrupt or truncated; "
            "download or convert it again."
        ) from exc
    return tensors, metadata


def _strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _load_strict(module: torch.nn.Module, sd: dict, path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise PluginFileError(
            f"Diff-Plugin: '{path}' is not a {what} state dict: missing keys [{show(missing)}], unexpected keys "
            f"[{show(unexpected)}]. Use the file released for this slot (or convert it with PlugKit's converter)."
        )
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise PluginFileError(f"Diff-Plugin: '{path}': entry '{key}' is not a tensor.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise PluginFileError(
                f"Diff-Plugin: '{path}': '{key}' has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} "
                f"for a {what}; this file is for another architecture."
            )
    module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def check_scb_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise PluginFileError(f"Diff-Plugin: cannot read SCB config '{config_path}' ({exc}); download it again.") from exc
    if not isinstance(config, dict):
        raise PluginFileError(f"Diff-Plugin: SCB config '{config_path}' is not a JSON object.")
    for key, want in SCB_CONFIG_REQUIRED.items():
        if key not in config:
            continue  # diffusers fills absent keys with the defaults we implement
        got = config[key]
        if isinstance(want, list) and isinstance(got, (list, tuple)):
            got = list(got)
        if key == "attention_head_dim" and isinstance(got, list) and len(got) == 1:
            got = got[0]
        if got != want:
            raise PluginFileError(
                f"Diff-Plugin: SCB config '{config_path}' has {key}={got!r}; PlugKit supports the released "
                f"SCB architecture ({key}={want!r}) only."
            )
    return config


def load_tpb_state(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise PluginFileError(f"Diff-Plugin: '{path}' holds no state dict (expected {{'model': state_dict}}).")
    return _strip_prefix(dict(sd))


def load_released_plugin(directory: str | os.PathLike, name: str | None = None) -> TaskPlugin:
    """Load ``<task>/scb/{config.json, diffusion_pytorch_model.bin}`` + ``<task>/tpb.pt`` strictly."""
    directory = Path(directory)
    name = name or directory.name
    config_path = directory / "scb" / "config.json"
    if not config_path.is_file():
        raise PluginFileError(f"Diff-Plugin: '{config_path}' not found; a released plugin folder holds scb/config.json.")
    check_scb_config(config_path)
    weights = next((directory / "scb" / n for n in SCB_WEIGHT_NAMES if (directory / "scb" / n).is_file()), None)
    if weights is None:
        raise PluginFileError(
            f"Diff-Plugin: no SCB weights in '{directory / 'scb'}' (expected diffusion_pytorch_model.bin or .safetensors)."
        )
    plugin = TaskPlugin(name=name)
    if weights.suffix == ".safetensors":
        scb_sd, _ = _load_safetensors(weights)
    else:
        scb_sd = _torch_load(weights)
        if not isinstance(scb_sd, dict):
            raise PluginFileError(f"Diff-Plugin: '{weights}' holds no state dict.")
    _load_strict(plugin.scb, _strip_prefix(dict(scb_sd)), weights, "Diff-Plugin SCB")
    tpb_path = directory / "tpb.pt"
    if not tpb_path.is_file():
        raise PluginFileError(f"Diff-Plugin: '{tpb_path}' not found; a released plugin folder holds tpb.pt.")
    _load_strict(plugin.tpb, load_tpb_state(tpb_path), tpb_path, "Diff-Plugin TPB")
    return plugin.train(False).requires_grad_(False)


def plugin_state_dict(plugin: TaskPlugin) -> dict[str, torch.Tensor]:
    sd = {f"tpb.{k}": v for k, v in plugin.tpb.state_dict().items()}
    sd.update({f"scb.{k}": v for k, v in plugin.scb.state_dict().items()})
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def plugin_metadata(plugin: TaskPlugin, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {"format": PLUGIN_FORMAT, "version": FORMAT_VERSION, "task": plugin.name,
            "start": "noise" if plugin.start_from_noise else "input"}
    meta.update(extra or {})
    return meta


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same folder, then rename over ``path`` (never a half-written file;
    the previous file stays whole until the new one is). The folder must exist: nothing is created here."""
    import safetensors.torch

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_plugin(plugin: TaskPlugin, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    return atomic_save_safetensors(plugin_state_dict(plugin), plugin_metadata(plugin, extra_metadata), path)


def load_plugin_safetensors(path: str | os.PathLike, name: str | None = None) -> tuple[TaskPlugin, dict[str, str]]:
    path = Path(path)
    tensors, metadata = _load_safetensors(path)
    if metadata.get("format") not in (None, PLUGIN_FORMAT) or not any(k.startswith("tpb.") for k in tensors):
        raise PluginFileError(
            f"Diff-Plugin: '{path}' is not a PlugKit Task-Plugin file (format {metadata.get('format')!r}); "
            "convert a released plugin folder with the PlugKit converter first."
        )
    task = metadata.get("task") or name or path.stem
    start = metadata.get("start")
    start_from_noise = (start == "noise") if start else task.lower() in NOISE_START_TASKS
    cond_weight = tensors.get("scb.controlnet_cond_embedding.weight")
    channels = int(cond_weight.shape[0]) if cond_weight is not None and cond_weight.ndim == 4 else 320
    plugin = TaskPlugin(name=name or task, start_from_noise=start_from_noise, scb_channels=channels)
    tpb = {k[4:]: v for k, v in tensors.items() if k.startswith("tpb.")}
    scb = {k[4:]: v for k, v in tensors.items() if k.startswith("scb.")}
    foreign = [k for k in tensors if not k.startswith(("tpb.", "scb."))]
    if foreign:
        raise PluginFileError(
            f"Diff-Plugin: '{path}' has keys outside tpb./scb. ({', '.join(foreign[:5])}); it is not a Task-Plugin file."
        )
    _load_strict(plugin.tpb, tpb, path, "Diff-Plugin TPB")
    _load_strict(plugin.scb, scb, path, "Diff-Plugin SCB")
    return plugin.train(False).requires_grad_(False), metadata


def load_plugin(path: str | os.PathLike, name: str | None = None) -> TaskPlugin:
    """A released plugin folder, or a PlugKit ``.safetensors`` plugin."""
    path = Path(path)
    if path.is_dir():
        return load_released_plugin(path, name=name)
    if path.suffix == ".safetensors":
        return load_plugin_safetensors(path, name=name)[0]
    if path.name in ("tpb.pt", "config.json") or path.parent.name == "scb":
        return load_released_plugin(path.parent if path.name == "tpb.pt" else path.parent.parent, name=name)
    raise PluginFileError(
        f"Diff-Plugin: '{path}' is neither a released plugin folder (scb/ + tpb.pt) nor a .safetensors plugin."
    )


def convert_released_plugin(directory: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Released plugin folder -> PlugKit single-file plugin (``<folder>.safetensors`` next to it by default)."""
    directory = Path(directory)
    plugin = load_released_plugin(directory)
    output = Path(output) if output else directory.with_suffix(".safetensors")
    return save_plugin(plugin, output, {"source": "released Diff-Plugin folder " + directory.name})


def load_selector(path: str | os.PathLike) -> PromptTuner:
    """The released ``PromptTunner.pt`` (``{'model': ...}``, optional ``module.`` prefix) or a safetensors copy."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd, _ = _load_safetensors(path)
    else:
        obj = _torch_load(path)
        sd = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise PluginFileError(f"Diff-Plugin: '{path}' holds no selector state dict (expected {{'model': state_dict}}).")
    tuner = PromptTuner()
    _load_strict(tuner, _strip_prefix(dict(sd)), path, "Diff-Plugin Plugin-Selector (PromptTunner)")
    return tuner.train(False).requires_grad_(False)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata only (no tensor is read); raises PluginFileError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise PluginFileError(f"Diff-Plugin: cannot read '{path}' ({type(exc).__name__}: {exc}).") from exc


# --- finding files inside the registered folders --------------------------------------------------

def is_inside(real: str, base_real: str) -> bool:
    return real != base_real and real.startswith(base_real.rstrip(os.sep) + os.sep)


def safe_relative_name(name: object) -> tuple[str, ...] | None:
    """The parts of a relative name as the scan lists it ('derain', 'team/my.safetensors'), or None for
    anything else: not a string, empty, absolute (posix or Windows, drive or UNC), '..' or NUL inside."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        return None
    text = name.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return None
    parts = tuple(p for p in PurePosixPath(text).parts if p != ".")
    if not parts or ".." in parts:
        return None
    return parts


def resolve_name(name: object, folders: list[str] | tuple[str, ...], kind: str = "plugin") -> Path | None:
    """The file or folder of ``name`` when it is one the scan of ``folders`` lists as ``kind`` ('plugin' or
    'selector'), else None: missing, not a plugin, or not a name inside the folders (absolute, '..').
    Callers give one message for all of these, so an answer says nothing about the rest of the disk."""
    parts = safe_relative_name(name)
    if parts is None:
        return None
    scan = scan_plugin_folders(folders)
    key = "/".join(parts)
    if key not in (scan.plugins if kind == "plugin" else scan.selectors):
        return None
    return Path(scan.paths[key])


_KIND_CACHE: dict[tuple[str, int, int], str] = {}


def safetensors_kind(path: str | os.PathLike) -> str:
    """'plugin', 'selector', 'other' or 'unreadable', from the header only; cached per (path, size, mtime)."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError:
        return "unreadable"
    key = (path, st.st_size, st.st_mtime_ns)
    kind = _KIND_CACHE.get(key)
    if kind is None:
        kind = _read_safetensors_kind(path)
        if len(_KIND_CACHE) > 4096:
            _KIND_CACHE.clear()
        _KIND_CACHE[key] = kind
    return kind


def _read_safetensors_kind(path: str) -> str:
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception:
        return "unreadable"
    if meta.get("format") == SELECTOR_FORMAT or (keys and all(k.split(".")[0] in ("proj_v", "proj_t", "logit_scale") for k in keys)):
        return "selector"
    if meta.get("format") == PLUGIN_FORMAT or any(k.startswith("tpb.") for k in keys):
        return "plugin"
    return "other"


@dataclass
class FolderScan:
    plugins: list[str] = field(default_factory=list)  # released folders and .safetensors plugins
    selectors: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)  # listed name -> its path (the first folder wins)
    dirs_visited: int = 0
    truncated: bool = False  # MAX_SCAN_DIRS reached: the lists may be incomplete


def scan_plugin_folders(folders: list[str] | tuple[str, ...], max_depth: int = MAX_SCAN_DEPTH,
                        max_dirs: int = MAX_SCAN_DIRS) -> FolderScan:
    """Plugins and selectors under ``folders``, as relative posix names (what the nodes list and accept).

    Links placed in the folders are followed, as ComfyUI follows them in its own model folders, but each
    real folder is entered at most once (by its resolved path), real folders before linked ones, so a
    link loop ends at once; the walk also stops ``max_depth`` levels down and after ``max_dirs`` folder
    listings in all. A released plugin folder is listed, never entered."""
    scan = FolderScan()
    plugins: dict[str, str] = {}
    selectors: dict[str, str] = {}
    visited: set[str] = set()
    for base in folders:
        base_real = os.path.realpath(base)
        if not os.path.isdir(base_real) or base_real in visited:
            continue
        visited.add(base_real)
        real_dirs: list[tuple[str, tuple[str, ...]]] = [(base, ())]
        linked_dirs: deque[tuple[str, tuple[str, ...]]] = deque()  # first found, first entered
        while real_dirs or linked_dirs:
            if real_dirs:
                directory, rel = real_dirs.pop()
            else:
                directory, rel = linked_dirs.popleft()
                real = os.path.realpath(directory)
                if real in visited:
                    continue  # a loop, or a folder already listed under its real name
                visited.add(real)
            if scan.dirs_visited >= max_dirs:
                scan.truncated = True
                break
            scan.dirs_visited += 1
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                child_rel = (*rel, entry.name)
                name = "/".join(child_rel)
                try:
                    is_dir = entry.is_dir()
                    is_file = not is_dir and entry.is_file()
                    is_link = entry.is_symlink()
                except OSError:
                    continue
                if is_dir:
                    if is_released_plugin_dir(entry.path):
                        plugins.setdefault(name, entry.path)
                    elif len(child_rel) < max_depth:
                        if is_link:
                            linked_dirs.append((entry.path, child_rel))
                        else:
                            real = os.path.realpath(entry.path)
                            if real not in visited:  # (bind mounts)
                                visited.add(real)
                                real_dirs.append((entry.path, child_rel))
                elif is_file:
                    if entry.name.endswith(".safetensors"):
                        kind = safetensors_kind(entry.path)
                        if kind == "plugin":
                            plugins.setdefault(name, entry.path)
                        elif kind == "selector":
                            selectors.setdefault(name, entry.path)
                    elif entry.name.endswith(".pt") and entry.name != "tpb.pt" and not entry.name.endswith(".optim.pt"):
                        selectors.setdefault(name, entry.path)
        if scan.truncated:
            log.warning("Diff-Plugin: stopped listing %s after %d folders; keep plugins at most %d levels deep "
                        "in a smaller folder", ", ".join(folders), max_dirs, max_depth)
            break
    scan.plugins, scan.selectors = sorted(plugins), sorted(selectors)
    scan.paths = {**selectors, **plugins}
    return scan
