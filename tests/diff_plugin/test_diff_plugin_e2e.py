"""Diff-Plugin workflows through the real ComfyUI server, with random-weight models in the released
layout (tools.workflows_diff_plugin.prepare_models): core CLIPVisionLoader, our loaders, KSampler."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools.host import REPO
from tools.models import CHECKPOINT_NAME


@pytest.fixture(scope="module")
def diff_plugin_server(sd15_checkpoint, tmp_path_factory):
    from tools.server import ComfyServer
    from tools.workflows_diff_plugin import prepare_models

    files = prepare_models()
    with ComfyServer(tmp_path_factory.mktemp("diff_plugin_server"), checkpoints={CHECKPOINT_NAME: sd15_checkpoint},
                     model_files=files) as server:
        yield server


# The selector workflow (diff_plugin_selector.json) is run by tests/e2e with every shipped workflow; its
# nodes are covered in-process by test_diff_plugin_host.py. Here: the single-plugin graph.
@pytest.mark.parametrize("name", ["diff_plugin_derain.json"])
def test_diff_plugin_workflow_runs(diff_plugin_server, name):
    from tools.workflow import ui_to_api

    server = diff_plugin_server
    info = server.object_info()
    spec = info["PlugKitTaskPluginLoader"]["input"]["required"]["plugin_name"]
    assert "derain" in (spec[1].get("options") or spec[0]), spec  # the released-layout folder is listed
    ui = json.loads((REPO / "workflows" / name).read_text())
    entry = server.run(ui_to_api(ui, info))
    files = server.output_files(entry)
    assert files, f"{name} produced no images"
    for f in files:
        img = np.asarray(Image.open(f))
        assert img.shape[:2] == (64, 64) and np.isfinite(img).all()
