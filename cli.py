"""PlugKit's command line. Run it with ComfyUI's Python, from the ComfyUI folder (or with COMFYUI_PATH
set), by its path, since the pack's folder name (e.g. ComfyUI-PlugKit) is not a Python module name:

    python custom_nodes/ComfyUI-PlugKit/cli.py train-diff-plugin --checkpoint ... --clip-vision ... \\
        --data ... --output models/diff_plugin/my_task.safetensors
    python custom_nodes/ComfyUI-PlugKit/cli.py convert-diff-plugin models/diff_plugin/derain

``<command> --help`` lists each command's options. Importing this file does nothing; only running it
puts the ComfyUI folder on ``sys.path`` and loads the pack from its folder as a package, the way
ComfyUI's custom-node loader does.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
PACKAGE = "plugkit_cli_pack"
COMMANDS = {
    "train-diff-plugin": ("nodes.diff_plugin.train_cli", "Train a Diff-Plugin Task-Plugin on (degraded, clean) pairs."),
    "convert-diff-plugin": ("nodes.diff_plugin.plugin_files", "Convert a released Diff-Plugin folder to one .safetensors file."),
}


def find_comfyui() -> Path:
    """COMFYUI_PATH, else the current folder, else the ComfyUI that holds this pack in custom_nodes/."""
    for candidate in (os.environ.get("COMFYUI_PATH"), os.getcwd(), str(PACK_DIR.parent.parent)):
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate).resolve()
    raise SystemExit("PlugKit CLI: ComfyUI not found. Run this from your ComfyUI folder or set COMFYUI_PATH to it.")


def load_pack() -> str:
    """Import the pack as a package (relative imports inside it then work), as ComfyUI's loader does."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, PACK_DIR / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return PACKAGE


def usage() -> str:
    lines = ["usage: cli.py <command> [options]", "", "commands:"]
    lines += [f"  {name:<22}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage() + "\n")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"cli.py: unknown command {command!r}\n\n{usage()}\n")
        return 2
    root = find_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a command run by hand, not an import: makes `comfy` importable
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():  # ComfyUI's --cpu, chosen for the user: its device probe needs CUDA otherwise
        comfy.cli_args.args.cpu = True
    module = importlib.import_module(f"{load_pack()}.{COMMANDS[command][0]}")
    if command == "convert-diff-plugin":
        rest = ["convert", *rest]
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
