"""End-to-end: the real ComfyUI server loads the pack and runs every shipped workflow."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.fixtures.models import CHECKPOINT_NAME
from tools.workflows.builder import Workflow, WorkflowError, shorten, ui_to_api

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def expected_node_ids(comfy) -> set[str]:
    from plugkit.nodes.extension import all_nodes

    return {n.GET_SCHEMA().node_id for n in all_nodes()}


def test_pack_imported_without_error(server):
    # Start-up only: later lines belong to workflow runs of other tests sharing this server.
    log = server.log_text().split("Starting server")[0]
    assert "ComfyUI-PlugKit" in log, "the server log does not mention the pack at all"
    pack_lines = [l for l in log.splitlines() if "PlugKit" in l or "pyproject" in l]
    bad = [l for l in pack_lines if re.search(r"IMPORT FAILED|Cannot import|Traceback|Error", l)]
    assert not bad, "\n".join(bad)
    # ComfyUI prints "<time> seconds: <path>" for each custom node that imported.
    assert re.search(r"seconds: .*ComfyUI-PlugKit\s*$", log, re.M), log[-3000:]


def test_object_info_lists_every_plugkit_node(server, comfy):
    info = server.object_info()
    expected = expected_node_ids(comfy)
    assert expected, "the pack registers no nodes"
    listed = {k for k in info if k.startswith("PlugKit")}
    assert listed == expected
    for node_id in expected:
        entry = info[node_id]
        assert entry["category"].startswith("PlugKit/"), node_id
        for section in ("required", "optional"):
            for name, spec in (entry["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert (REPO / "js" / "docs" / f"{node_id}.md").is_file(), f"no help page for {node_id}"


def test_core_node_ids_untouched(server):
    info = server.object_info()
    for core in ("FreeU", "FreeU_V2", "DifferentialDiffusion", "KSampler"):
        assert info[core]["python_module"] in ("nodes", "comfy_extras.nodes_freelunch",
                                               "comfy_extras.nodes_differential_diffusion"), core


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs(server, path):
    ui = json.loads(path.read_text())
    assert "nodes" in ui and "links" in ui, f"{path.name} is not UI format"
    prompt = ui_to_api(ui, server.object_info())
    if not torch.cuda.is_available():  # CPU, random weights: shortened as queued (the file is unchanged)
        shorten(prompt)
    entry = server.run(prompt)
    files = server.output_files(entry)
    assert files, f"{path.name} produced no images"
    for f in files:
        img = np.asarray(Image.open(f))
        assert img.size > 0 and np.isfinite(img).all()
    # Every image output node of the workflow (SaveImage, PreviewImage) showed a picture.
    shown = {nid for nid, out in entry["outputs"].items() if out.get("images")}
    image_outputs = {nid for nid, node in prompt.items() if node["class_type"] in ("SaveImage", "PreviewImage")}
    assert image_outputs <= shown, f"{path.name}: output nodes {sorted(image_outputs - shown)} showed no image"


def test_missing_node_is_reported(server, tmp_path):
    """A workflow naming a node id that does not exist must fail, not silently run."""
    ui = {"nodes": [{"id": 1, "type": "PlugKitDoesNotExist", "inputs": [], "outputs": [],
                     "widgets_values": [], "mode": 0}], "links": []}
    with pytest.raises(WorkflowError, match="PlugKitDoesNotExist"):
        ui_to_api(ui, server.object_info())


def core_graph(info: dict) -> dict:
    wf = Workflow(info)
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    freeu = wf.add("FreeU_V2", model=ckpt[0])
    diff = wf.add("DifferentialDiffusion", model=freeu[0])
    pos = wf.add("CLIPTextEncode", clip=ckpt[1], text="a photo of a cat")
    neg = wf.add("CLIPTextEncode", clip=ckpt[1], text="blurry")
    lat = wf.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    ks = wf.add("KSampler", model=diff[0], positive=pos[0], negative=neg[0], latent_image=lat[0],
                seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    wf.add("SaveLatent", samples=ks[0], filename_prefix="core_graph")
    return wf.to_api()


def _saved_latent(server, entry) -> bytes:
    import safetensors.torch

    outs = [o for o in entry["outputs"].values() if o.get("latents")]
    lat = outs[0]["latents"][0]
    path = server.base / "output" / lat.get("subfolder", "") / lat["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"].numpy().tobytes()


def test_pack_changes_no_core_output(server, sd15_checkpoint, tmp_path):
    """The same core graph, same seed, with and without the pack: bitwise equal."""
    from tools.harness.server import ComfyServer

    prompt = core_graph(server.object_info())
    with_pack = _saved_latent(server, server.run(prompt))
    with ComfyServer(tmp_path / "nopack", checkpoints={CHECKPOINT_NAME: sd15_checkpoint},
                     with_pack=False) as bare:
        assert not any(k.startswith("PlugKit") for k in bare.object_info())
        without = _saved_latent(bare, bare.run(prompt))
    assert with_pack == without
