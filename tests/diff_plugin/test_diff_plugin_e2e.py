"""Diff-Plugin on the real ComfyUI server (the shared e2e server, with random-weight models in the
released layout from tools.workflows_diff_plugin.prepare_models). The shipped workflows themselves
run in tests/e2e with every other workflow; here: the server finds the released layout."""
from __future__ import annotations


def test_released_layout_is_listed_by_the_server(server):
    info = server.object_info()
    spec = info["PlugKitTaskPluginLoader"]["input"]["required"]["plugin_name"]
    options = spec[1].get("options") or spec[0]
    assert "derain" in options, spec  # the released-layout folder (scb/ + tpb.pt) is listed
    clip_spec = info["CLIPVisionLoader"]["input"]["required"]["clip_name"]
    assert clip_spec[1].get("options") or clip_spec[0], "no CLIP vision model is visible to the server"
