"""The pack's command line (``cli.py``), run as a user runs it: a separate Python process started in the
ComfyUI folder, by path (the pack's folder name is not a module name)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diff_plugin_testlib import write_released_plugin

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "cli.py"


def run_cli(comfyui: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COMFYUI_PATH", None)  # found from the working folder, as when a user runs it there
    return subprocess.run([sys.executable, str(CLI), *args], cwd=comfyui, env=env, capture_output=True, text=True)


def test_importing_cli_does_nothing(comfy):
    code = ("import importlib.util, sys; before = set(sys.modules); n = len(sys.path);"
            f"spec = importlib.util.spec_from_file_location('plugkit_cli', {str(CLI)!r});"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
            "new = set(sys.modules) - before;"
            "assert len(sys.path) == n and not any(k.startswith(('comfy', 'torch', m.PACKAGE)) for k in new), new")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_usage_and_unknown_command(comfy):
    out = run_cli(comfy, "--help")
    assert out.returncode == 0 and "train-diff-plugin" in out.stdout and "convert-diff-plugin" in out.stdout
    bad = run_cli(comfy, "nope")
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_convert_released_folder(comfy, tmp_path):
    from plugkit.nodes.diff_plugin import plugin_files as pf

    folder, _, _ = write_released_plugin(tmp_path, "desnow", seed=6, module_prefix=True)
    out = tmp_path / "desnow.safetensors"
    res = run_cli(comfy, "convert-diff-plugin", str(folder), str(out))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr and str(out) in res.stderr
    converted, released = pf.load_plugin(out), pf.load_plugin(folder)
    assert converted.name == "desnow"
    for key, value in released.state_dict().items():
        assert converted.state_dict()[key].equal(value), key
    missing = run_cli(comfy, "convert-diff-plugin", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "nowhere" in missing.stderr


def test_train_from_the_command_line(comfy, sd15_checkpoint, tmp_path):
    """One training step of the full-size random SD1.5 with the random CLIP ViT-L/14 files, at 64 px."""
    from plugkit.nodes.diff_plugin import plugin_files as pf
    from tools.test_models import prepare_model_files
    from tools.workflows_diff_plugin import CLIP_VISION_NAME

    clip_vision = prepare_model_files()[f"clip_vision/{CLIP_VISION_NAME}"]
    data = tmp_path / "pairs"
    (data / "input").mkdir(parents=True)
    (data / "target").mkdir()
    rng = np.random.default_rng(0)
    clean = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(clean).save(data / "target" / "a.png")
    Image.fromarray(np.clip(clean.astype(int) + 60, 0, 255).astype(np.uint8)).save(data / "input" / "a.png")
    out = tmp_path / "models" / "mine.safetensors"
    res = run_cli(comfy, "train-diff-plugin", "--checkpoint", str(sd15_checkpoint), "--clip-vision", str(clip_vision),
                  "--data", str(data), "--output", str(out), "--resolution", "64", "--steps", "1", "--save-every", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 1/1 loss" in res.stderr
    plugin = pf.load_plugin(out)
    assert plugin.name == "mine" and plugin.scb.channels == 320
