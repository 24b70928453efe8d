"""The README's main job, as a new user runs it: ``git clone`` then ``make demo``, in its own process.

The clone is fresh (a real ``git clone`` of this repository, plus the working tree's uncommitted
changes laid over it, so the test checks what is on disk). Nothing is prepared for it: its cache
(``PLUGKIT_CACHE``) is a new empty folder, so the demo generates the random-weight checkpoint and the
Diff-Plugin test models itself, as on a fresh machine. Two things are shared so the test does not
download: the venv (``PLUGKIT_VENV``, which ``make`` and ``tools/setup.sh`` read) and the unpacked
pinned ComfyUI (linked into the new cache where ``tools.harness.host`` looks for it).

It fails when ``make demo`` exits non-zero (e.g. ``ModuleNotFoundError: No module named 'comfy'``
while generating the checkpoint: run against commit 9d561f8 it failed that way), when a workflow in
the clone's ``workflows/`` has no comparison sheet, or when a shortened CPU run does not say so.
Slow (several minutes on 2 cores): it is part of the end-to-end tier.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def fresh_clone(dest: Path) -> Path:
    """``git clone`` of this repository, then the working tree's uncommitted state laid over it."""
    _git("clone", "--quiet", str(REPO), str(dest), cwd=dest.parent)
    for line in _git("status", "--porcelain", "--untracked-files=all", "-z").split("\0"):
        if not line:
            continue
        rel = line[3:]
        src, dst = REPO / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif not src.exists() and dst.exists():
            dst.unlink()
    return dest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from tools.harness.host import comfyui_path

    host = comfyui_path()  # the unpacked pinned ComfyUI (or COMFYUI_PATH's checkout)
    work = tmp_path_factory.mktemp("fresh_machine")
    clone = fresh_clone(work / "ComfyUI-PlugKit")
    assert not (clone / ".cache").exists() and not (clone / "out").exists()
    cache = work / "cache"
    cache.mkdir()
    (cache / host.name).symlink_to(host, target_is_directory=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMFYUI_PATH", "PLUGKIT_CHECKPOINT", "PLUGKIT_DEMO_FULL", "PYTHONPATH")}
    env.update(PLUGKIT_CACHE=str(cache), PLUGKIT_VENV=str(Path(sys.prefix)))
    if not host.name.startswith("comfyui-"):  # a user's own checkout: name it as the user does
        env["COMFYUI_PATH"] = str(host)
    proc = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / "demo.log").write_text(log)
    return clone, cache, proc.returncode, log


def test_make_demo_from_a_fresh_clone(demo_run):
    clone, cache, rc, log = demo_run
    assert rc == 0, f"`make demo` exited {rc}:\n{log[-6000:]}"
    assert (cache / "models" / "v1-5-pruned-emaonly.safetensors").is_file(), "the demo did not generate the checkpoint"
    workflows = sorted((clone / "workflows").glob("*.json"))
    assert workflows, "the clone has no workflows"
    missing = [w.stem for w in workflows if not (clone / "out" / f"{w.stem}_comparison.png").is_file()]
    assert not missing, f"no comparison sheet for {missing}:\n{log[-6000:]}"
    for w in workflows:
        sheet = Image.open(clone / "out" / f"{w.stem}_comparison.png")
        assert sheet.width > 256 and sheet.height > 64, w.stem
    assert "RANDOM-WEIGHT" in log and "noise" in log


def test_cpu_demo_says_it_shortens(demo_run):
    import torch

    _, _, rc, log = demo_run
    assert rc == 0, log[-3000:]
    if torch.cuda.is_available():
        assert "as shipped" in log and "shortened:" not in log
    else:
        assert "SHORTENED" in log, log[-3000:]
        assert "shortened: KSampler" in log and "-> 4" in log, log[-3000:]
