"""PlugKit's main job: run every shipped workflow on a real ComfyUI and write comparison sheets.

``make demo`` (or ``python -m tools.demo``). Starts ComfyUI headless (loopback only) with the pack
installed, queues each workflow in ``workflows/``, copies the outputs to ``out/<workflow>/`` and
writes ``out/<workflow>_comparison.png``: the technique off (a branch without PlugKit nodes, or the
input image) beside on. Checkpoints: ``PLUGKIT_CHECKPOINT`` (a .safetensors file; every workflow's
checkpoint is replaced by it), else the models in ``COMFYUI_PATH``, else a random-weight SD1.5
checkpoint (generated once into the cache), whose pictures are noise.

With CUDA or a real checkpoint the workflows run as shipped (512 px, the techniques' official step
counts). On a CPU with the random checkpoint each one is shortened as it is queued (``tools.workflows.builder.
shorten``: at most 4 steps, 128 px, a segmenter of 3 classifiers) and the demo says so; ``PLUGKIT_DEMO_FULL=1`` runs them as shipped
anyway. The shipped files are never changed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from tools.harness.host import REPO, cache_dir
from tools.harness.server import ComfyServer
from tools.workflows.builder import CPU_SIZE, CPU_STEPS, shorten, ui_to_api

log = logging.getLogger("plugkit.demo")

OUT = REPO / "out"
SHEET_CELL = 256


def _ancestors(prompt: dict, node_id: str) -> set[str]:
    seen, stack = set(), [node_id]
    while stack:
        nid = stack.pop()
        for v in prompt[nid]["inputs"].values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in seen:
                seen.add(v[0])
                stack.append(v[0])
    return seen


def _uses_plugkit(prompt: dict, node_id: str) -> bool:
    return any(prompt[a]["class_type"].startswith("PlugKit") for a in _ancestors(prompt, node_id))


def _saved_images(server: ComfyServer, outputs: dict) -> list[Path]:
    """Saved images only (previews go to temp/ and are not results)."""
    saved = {"images": [i for i in outputs.get("images", []) if i.get("type", "output") == "output"]}
    return server.output_files({"outputs": {"x": saved}})


def _cell(path: Path, label: str) -> Image.Image:
    img = Image.open(path).convert("RGB")
    scale = SHEET_CELL / max(img.size)  # every cell the same size: shortened outputs beside 512 px inputs
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    cell = Image.new("RGB", (img.width, img.height + 24), "white")
    cell.paste(img, (0, 24))
    ImageDraw.Draw(cell).text((6, 6), label, fill="black")
    return cell


def comparison_sheet(off: list[tuple[Path, str]], on: list[tuple[Path, str]], dest: Path, title: str) -> Path:
    cells = [_cell(p, f"OFF: {l}") for p, l in off] + [_cell(p, f"ON: {l}") for p, l in on]
    width = sum(c.width for c in cells) + 8 * (len(cells) + 1)
    height = max(c.height for c in cells) + 40
    sheet = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(sheet).text((8, 8), title, fill="black")
    x = 8
    for c in cells:
        sheet.paste(c, (x, 32))
        x += c.width + 8
    sheet.save(dest)
    return dest


def _checkpoints() -> tuple[dict[str, Path], list[str], str | None]:
    """(checkpoints to link, extra server args, checkpoint name that replaces every workflow's)."""
    user_ckpt = os.environ.get("PLUGKIT_CHECKPOINT")
    if user_ckpt:
        path = Path(user_ckpt).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"PLUGKIT_CHECKPOINT={user_ckpt} is not a file")
        log.info("Using your checkpoint %s for every workflow.", path)
        return {path.name: path}, [], path.name
    comfy = os.environ.get("COMFYUI_PATH")
    if comfy and any((Path(comfy) / "models" / "checkpoints").glob("*.safetensors")):
        yaml = cache_dir() / "demo_extra_model_paths.yaml"
        yaml.write_text(f"user_models:\n  base_path: {Path(comfy).resolve()}\n"
                        "  checkpoints: models/checkpoints\n  clip_vision: models/clip_vision\n"
                        "  vae: models/vae\n  diff_plugin: models/diff_plugin\n")
        log.info("Using the models in %s/models.", comfy)
        return {}, ["--extra-model-paths-config", str(yaml)], None
    from tools.fixtures.models import CHECKPOINT_NAME, ensure_random_sd15_checkpoint

    log.warning("No PLUGKIT_CHECKPOINT and no models in COMFYUI_PATH: using a RANDOM-WEIGHT SD1.5 "
                "checkpoint. The pictures will be noise because the weights are random; set "
                "PLUGKIT_CHECKPOINT=/path/to/v1-5-pruned-emaonly.safetensors for real images.")
    return {CHECKPOINT_NAME: ensure_random_sd15_checkpoint()}, [], None


def _shortened_run(random_weights: bool) -> bool:
    """Shorten the workflows: only on a CPU with random weights, unless PLUGKIT_DEMO_FULL=1."""
    import torch

    if not random_weights or torch.cuda.is_available():
        return False
    return os.environ.get("PLUGKIT_DEMO_FULL", "") not in ("1", "true", "yes")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tools.fixtures.model_files import prepare_model_files

    workflows = sorted((REPO / "workflows").glob("*.json"))
    if not workflows:
        log.error("No workflows in %s", REPO / "workflows")
        return 1
    checkpoints, extra_args, override = _checkpoints()
    random_weights = not override and not extra_args
    model_files = prepare_model_files() if random_weights else {}
    short = _shortened_run(random_weights)
    if short:
        log.warning("CPU with random weights: every workflow is SHORTENED as it is queued (at most %d "
                    "sampling steps, %d px images and latents, a segmenter of 3 classifiers and 8 epochs) so "
                    "the demo finishes in minutes. The "
                    "files in workflows/ keep their settings (512 px, official step counts); with CUDA, "
                    "a real checkpoint or PLUGKIT_DEMO_FULL=1 they run as shipped.", CPU_STEPS, CPU_SIZE)
    else:
        log.info("Running the workflows as shipped.")
    OUT.mkdir(exist_ok=True)
    base = cache_dir() / "demo_base"
    shutil.rmtree(base / "output", ignore_errors=True)
    failures = []
    with ComfyServer(base, checkpoints=checkpoints, model_files=model_files, extra_args=extra_args) as server:
        info = server.object_info()
        for wf_path in workflows:
            name = wf_path.stem
            log.info("Running %s ...", wf_path.name)
            prompt = ui_to_api(json.loads(wf_path.read_text()), info)
            if override:
                for node in prompt.values():
                    if "ckpt_name" in node["inputs"]:
                        node["inputs"]["ckpt_name"] = override
            if short:
                for change in shorten(prompt):
                    log.info("  shortened: %s", change)
            if random_weights:
                from tools.fixtures.models import CHECKPOINT_NAME

                for node in prompt.values():
                    ckpt = node["inputs"].get("ckpt_name")
                    if isinstance(ckpt, str) and ckpt != CHECKPOINT_NAME:
                        log.info("  stand-in: %s is the random SD1.5 checkpoint here (no random checkpoint "
                                 "of that family is generated)", ckpt)
            try:
                entry = server.run(prompt)
            except Exception as exc:  # report every workflow, then fail at the end
                log.error("%s failed: %s", wf_path.name, exc)
                failures.append(name)
                continue
            dest = OUT / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            off, on = [], []
            for node_id, outputs in entry["outputs"].items():
                title = prompt[node_id]["class_type"]
                for img in _saved_images(server, outputs):
                    copied = dest / img.name
                    shutil.copy2(img, copied)
                    (on if _uses_plugkit(prompt, node_id) else off).append((copied, title))
            if not off:
                for node_id, node in prompt.items():
                    if node["class_type"] == "LoadImage":
                        src = server.base / "input" / node["inputs"]["image"]
                        if src.is_file():
                            off.append((src, "input image"))
            if on:
                sheet = comparison_sheet(off, on, OUT / f"{name}_comparison.png",
                                         f"{name}: technique off vs on")
                log.info("  -> %s", sheet.relative_to(REPO))
    log.info("Outputs and comparison sheets are in %s", OUT)
    if random_weights:
        log.warning("Reminder: these pictures come from random weights, so they are noise.")
    if failures:
        log.error("Failed workflows: %s", ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
