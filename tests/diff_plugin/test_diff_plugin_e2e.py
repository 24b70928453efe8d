"""Diff-Plugin on the real ComfyUI server (the shared e2e server, with random-weight models in the
released layout from tools.fixtures.diff_plugin_models.prepare_models). The shipped workflows themselves
run in tests/e2e with every other workflow; here: the server finds the released layout."""
from __future__ import annotations


def _choices(spec: list) -> list:
    """A COMBO's choices from object_info: V3 puts them in the options, V1 as the type itself."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return opts.get("options") or (spec[0] if isinstance(spec[0], list) else [])


def test_released_layout_is_listed_by_the_server(server):
    info = server.object_info()
    spec = info["PlugKitTaskPluginLoader"]["input"]["required"]["plugin_name"]
    assert "derain" in _choices(spec), spec  # the released-layout folder (scb/ + tpb.pt) is listed
    clip_spec = info["CLIPVisionLoader"]["input"]["required"]["clip_name"]
    assert _choices(clip_spec), "no CLIP vision model is visible to the server"


def test_training_node_reports_live_loss_over_the_websocket(server, tmp_path):
    """A 2-step training graph queued through /prompt (the random full-size SD1.5 checkpoint and the
    random CLIP ViT-L/14 the server has): the node's progress and its loss text reach a websocket
    client, and the saved plugin reloads with our loader."""
    import math
    import re
    import uuid

    from plugkit.nodes.diff_plugin import plugin_files
    from test_diff_plugin_training import write_pairs
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow
    from tools.fixtures.diff_plugin_models import CLIP_VISION_NAME

    data = write_pairs(tmp_path / "pairs", size=64)
    name = f"e2e_train_{uuid.uuid4().hex[:8]}"
    wf = Workflow(server.object_info())
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    cv = wf.add("CLIPVisionLoader", clip_name=CLIP_VISION_NAME)
    train = wf.add("PlugKitTrainTaskPlugin", model=ckpt[0], clip_vision=cv[0], vae=ckpt[2], data_folder=str(data),
                   plugin_name=name, resolution=64, steps=2, batch_size=1, learning_rate=1e-5, save_every=0, seed=0,
                   resume=False, start="input")
    node = str(train.id)
    entry, messages = server.run_listening(wf.to_api())

    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == node]
    assert progress, [m["type"] for m in messages]
    assert {p["max"] for p in progress} == {2} and max(p["value"] for p in progress) == 2, progress
    texts = [m["data"]["text"] for m in messages if m["type"] == "progress_text" and m["data"]["node"] == node]
    assert len(texts) == 2, texts
    for step, text in enumerate(texts, start=1):
        found = re.fullmatch(r"step (\d+)/2\s+loss (\S+)", text)
        assert found and int(found.group(1)) == step, text
        assert math.isfinite(float(found.group(2))), text
    assert name in entry["outputs"][node]["text"][0] and "steps 0 -> 2" in entry["outputs"][node]["text"][0]

    saved = server.base / "models" / "diff_plugin" / f"{name}.safetensors"
    assert saved.is_file(), sorted(p.name for p in saved.parent.iterdir())
    plugin, meta = plugin_files.load_plugin_safetensors(saved)
    assert meta["step"] == "2" and plugin.scb.channels == 320 and plugin.name == name
