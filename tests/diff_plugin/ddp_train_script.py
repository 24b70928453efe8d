"""Test launcher (not shipped): the tiny in-process models (the fixtures' seeds) trained by
``train_cli.main`` with the given arguments; run as ``python`` or under ``torchrun`` (train_cli then
joins torch's env:// process group itself)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.harness import host  # noqa: E402

host.register_pack()
host.setup_in_process()

from tools.fixtures.models import build_clip_vision, build_model, build_vae  # noqa: E402

from plugkit.nodes.diff_plugin.train_cli import main  # noqa: E402

if __name__ == "__main__":
    import logging

    logging.getLogger().setLevel(logging.INFO)  # ComfyUI set up the root logger at WARNING
    sys.exit(main(["--checkpoint", "unused", "--clip-vision", "unused", *sys.argv[1:]], model=build_model(seed=0),
                  clip_vision=build_clip_vision(seed=0, layers=2, intermediate=256), vae=build_vae(seed=0, channels=32)))
