"""Diff-Plugin on the real ComfyUI server (the shared e2e server, with random-weight models in the
released layout from tools.workflows_diff_plugin.prepare_models). The shipped workflows themselves
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
