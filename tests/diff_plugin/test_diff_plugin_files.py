"""Diff-Plugin files: the released layout loads strictly; bad files give clear errors. No ComfyUI."""
from __future__ import annotations

import pickle

import pytest
import torch

from plugkit.nodes.diff_plugin import plugin_files as pf
from plugkit.nodes.diff_plugin.plugin_selector import PromptTuner
from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

from diff_plugin_testlib import RELEASED_SCB_CONFIG, random_state, write_released_plugin  # noqa: E402


def _assert_loaded(plugin, scb, tpb):
    got_scb = plugin.scb.state_dict()
    got_tpb = plugin.tpb.state_dict()
    assert set(got_scb) == set(scb) and set(got_tpb) == set(tpb)
    assert all(torch.equal(got_scb[k], scb[k]) for k in scb)
    assert all(torch.equal(got_tpb[k], tpb[k]) for k in tpb)


def test_released_layout_loads_strictly(released_plugin):
    folder, scb, tpb = released_plugin
    plugin = pf.load_plugin(folder)
    assert plugin.name == "derain" and not plugin.start_from_noise
    _assert_loaded(plugin, scb, tpb)
    assert not any(p.requires_grad for p in plugin.parameters())


def test_module_prefix_and_noise_start_task(tmp_path):
    folder, scb, tpb = write_released_plugin(tmp_path, "lowlight", seed=3, module_prefix=True)
    raw = torch.load(folder / "tpb.pt", weights_only=True)["model"]
    assert all(k.startswith("module.") for k in raw)
    plugin = pf.load_plugin(folder)
    _assert_loaded(plugin, scb, tpb)
    assert plugin.start_from_noise


def test_released_config_with_extra_keys_loads(tmp_path):
    config = dict(RELEASED_SCB_CONFIG, concat_input=False, enable_mask=False, use_vae_conditioning=True,
                  vae_cond_in_channels=4, way_to_concat="cat")
    config.pop("_class_name")
    folder, scb, tpb = write_released_plugin(tmp_path, "face", config=config)
    _assert_loaded(pf.load_plugin(folder), scb, tpb)


def test_truncated_scb_weights_name_the_file(released_plugin):
    folder, _, _ = released_plugin
    weights = folder / "scb" / "diffusion_pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(pf.PluginFileError, match="diffusion_pytorch_model.bin") as err:
        pf.load_plugin(folder)
    assert "corrupt" in str(err.value)


def test_corrupt_tpb_names_the_file(released_plugin):
    folder, _, _ = released_plugin
    (folder / "tpb.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(pf.PluginFileError, match="tpb.pt"):
        pf.load_plugin(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(released_plugin):
    folder, _, _ = released_plugin
    with open(folder / "tpb.pt", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(pf.PluginFileError, match="tpb.pt"):
        pf.load_plugin(folder)


def test_foreign_key_set_names_the_file_and_keys(released_plugin):
    folder, _, _ = released_plugin
    torch.save({"model": {"visual_projection.0.weight": torch.zeros(1024, 1024), "foo.bar": torch.zeros(3)}},
               folder / "tpb.pt")
    with pytest.raises(pf.PluginFileError, match=r"tpb\.pt.*missing keys.*unexpected keys \[foo\.bar\]"):
        pf.load_plugin(folder)


def test_foreign_scb_weights(released_plugin):
    folder, _, _ = released_plugin
    torch.save({"conv_in.weight": torch.zeros(320, 4, 3, 3)}, folder / "scb" / "diffusion_pytorch_model.bin")
    with pytest.raises(pf.PluginFileError, match="diffusion_pytorch_model.bin.*not a Diff-Plugin SCB"):
        pf.load_plugin(folder)


def test_wrong_shape_is_an_error(released_plugin):
    folder, scb, _ = released_plugin
    scb["controlnet_cond_embedding.weight"] = torch.zeros(320, 8, 3, 3)
    torch.save(scb, folder / "scb" / "diffusion_pytorch_model.bin")
    with pytest.raises(pf.PluginFileError, match="has shape"):
        pf.load_plugin(folder)


def test_other_scb_architecture_in_config_is_an_error(tmp_path):
    config = dict(RELEASED_SCB_CONFIG, block_out_channels=[320, 640])
    folder, _, _ = write_released_plugin(tmp_path, "derain", config=config)
    with pytest.raises(pf.PluginFileError, match="config.json.*block_out_channels"):
        pf.load_plugin(folder)


def test_missing_files(tmp_path):
    folder, _, _ = write_released_plugin(tmp_path, "derain")
    (folder / "tpb.pt").unlink()
    with pytest.raises(pf.PluginFileError, match="tpb.pt"):
        pf.load_released_plugin(folder)
    with pytest.raises(pf.PluginFileError):
        pf.load_plugin(tmp_path / "nothing.txt")


def test_convert_to_safetensors_round_trip(released_plugin, tmp_path):
    folder, scb, tpb = released_plugin
    out = pf.convert_released_plugin(folder, tmp_path / "out" / "derain.safetensors")
    plugin, meta = pf.load_plugin_safetensors(out)
    assert meta["format"] == pf.PLUGIN_FORMAT and meta["task"] == "derain" and meta["start"] == "input"
    _assert_loaded(plugin, scb, tpb)
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic write leaves no temporary
    assert pf.main(["convert", str(folder), str(tmp_path / "cli.safetensors")]) == 0
    assert (tmp_path / "cli.safetensors").is_file()


def test_safetensors_start_metadata_and_corruption(tmp_path):
    plugin = TaskPlugin("my_lowlight", start_from_noise=True)
    path = pf.save_plugin(plugin, tmp_path / "p.safetensors")
    loaded, meta = pf.load_plugin_safetensors(path)
    assert loaded.start_from_noise and meta["start"] == "noise"
    data = path.read_bytes()
    path.write_bytes(data[:1000])
    with pytest.raises(pf.PluginFileError, match="p.safetensors"):
        pf.load_plugin(path)


def test_selector_released_and_safetensors(tmp_path):
    sd = random_state(PromptTuner(), 9)
    path = tmp_path / "PromptTunner.pt"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    tuner = pf.load_selector(path)
    assert all(torch.equal(tuner.state_dict()[k], sd[k]) for k in sd)
    st = pf.save_selector(tuner, tmp_path / "sel.safetensors")
    again = pf.load_selector(st)
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    torch.save({"model": {"proj_v.weight": torch.zeros(768, 768)}}, path)
    with pytest.raises(pf.PluginFileError, match="PromptTunner.pt.*missing keys"):
        pf.load_selector(path)
