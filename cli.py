"""PlugKit's command line. Run it with ComfyUI's Python, by its path (the pack's folder name, e.g.
ComfyUI-PlugKit or plugkit, is not a Python module name), from the ComfyUI folder or with
``--comfyui PATH``:

    python custom_nodes/ComfyUI-PlugKit/cli.py train-diff-plugin --checkpoint ... --clip-vision ... \\
        --data ... --output models/diff_plugin/my_task.safetensors
    python custom_nodes/ComfyUI-PlugKit/cli.py convert-diff-plugin models/diff_plugin/derain

``<command> --help`` lists each command's options. Importing this file does nothing; only running it
checks the arguments, then puts the ComfyUI folder on ``sys.path`` and loads the pack from its folder
as a package, the way ComfyUI's custom-node loader does. A mistake is one line on stderr: exit 2 for
a wrong command line, 1 for a file that cannot be used.
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
    "train-diff-plugin": "Train a Diff-Plugin Task-Plugin on (degraded, clean) pairs.",
    "convert-diff-plugin": "Convert a released Diff-Plugin folder to one .safetensors file.",
}


def is_comfyui(path: str | os.PathLike) -> bool:
    return (Path(path) / "comfy" / "model_management.py").is_file()


def find_comfyui(explicit: str | None) -> Path | None:
    """``--comfyui``, else the current folder, else the ComfyUI that holds this pack in custom_nodes/."""
    if explicit:
        return Path(explicit).resolve() if is_comfyui(explicit) else None
    for candidate in (Path.cwd(), PACK_DIR.parent.parent):
        if is_comfyui(candidate):
            return candidate.resolve()
    return None


def load_pack() -> str:
    """Import the pack as a package (relative imports inside it then work), as ComfyUI's loader does.
    Its ``__init__`` imports nothing heavy; ComfyUI is needed only by the node modules."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, PACK_DIR / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return PACKAGE


def usage() -> str:
    lines = ["usage: cli.py <command> [options]", "", "commands:"]
    lines += [f"  {name:<22}{help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "'cli.py <command> --help' lists the command's options (--comfyui PATH names the ComfyUI folder)."]
    return "\n".join(lines)


def _error(line: str) -> None:
    sys.stderr.write(" ".join(str(line).split("\n")) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage() + "\n")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _error(f"cli.py: error: unknown command {command!r}; use one of {', '.join(COMMANDS)} (see 'cli.py --help')")
        return 2
    commands = importlib.import_module(f"{load_pack()}.nodes.diff_plugin.train_cli")
    try:
        args, output = commands.parse(command, rest)  # checked before anything heavy is loaded
        root = find_comfyui(args.comfyui)
        if root is None:
            where = f"'{args.comfyui}' is not a ComfyUI folder (no comfy/model_management.py there)" if args.comfyui \
                else "ComfyUI not found: run this from your ComfyUI folder"
            raise commands.UsageError(f"cli.py {command}: error: {where}; or pass --comfyui PATH")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))  # a command run by hand, not an import: makes `comfy` importable
        import comfy.cli_args
        import torch

        if not torch.cuda.is_available():  # ComfyUI's --cpu, chosen for the user: its device probe needs CUDA otherwise
            comfy.cli_args.args.cpu = True
        return commands.run(command, args, output)
    except commands.UsageError as exc:
        _error(str(exc))
        return 2
    except (ValueError, OSError) as exc:  # a file that cannot be used, a full disk, ...: one line, no traceback
        _error(f"cli.py {command}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        _error(f"cli.py {command}: interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
