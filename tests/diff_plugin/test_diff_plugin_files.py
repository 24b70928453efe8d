"""Diff-Plugin files: the released layout loads strictly; bad files give clear errors. No ComfyUI."""
from __future__ import annotations

import pickle

import pytest
import torch

from plugkit.nodes.diff_plugin import plugin_files as pf
from plugkit.nodes.diff_plugin.plugin_selector import PromptTuner
from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

from diff_plugin_testlib import RELEASED_SCB_CONFIG, random_state, save_selector, write_released_plugin  # noqa: E402


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
    (tmp_path / "out").mkdir()
    out = pf.convert_released_plugin(folder, tmp_path / "out" / "derain.safetensors")
    plugin, meta = pf.load_plugin_safetensors(out)
    assert meta["format"] == pf.PLUGIN_FORMAT and meta["task"] == "derain" and meta["start"] == "input"
    _assert_loaded(plugin, scb, tpb)
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic write leaves no temporary
    with pytest.raises(FileNotFoundError):  # a missing output folder is never created
        pf.convert_released_plugin(folder, tmp_path / "missing" / "derain.safetensors")
    assert not (tmp_path / "missing").exists()


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
    st = save_selector(tuner, tmp_path / "sel.safetensors")
    again = pf.load_selector(st)
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    torch.save({"model": {"proj_v.weight": torch.zeros(768, 768)}}, path)
    with pytest.raises(pf.PluginFileError, match="PromptTunner.pt.*missing keys"):
        pf.load_selector(path)


# --- names and folder scans ---------------------------------------------------------------------

def _plugin_tree(tmp_path):
    """models/diff_plugin with a released folder and a .safetensors plugin, and a plugin outside it."""
    base = tmp_path / "models" / "diff_plugin"
    write_released_plugin(base, "derain", seed=0)
    pf.save_plugin(TaskPlugin("mine"), base / "mine.safetensors")
    outside = tmp_path / "elsewhere"
    write_released_plugin(outside, "evil", seed=1)
    pf.save_plugin(TaskPlugin("evil_file"), outside / "evil_file.safetensors")
    return base, outside


def test_only_listed_names_resolve(tmp_path):
    base, outside = _plugin_tree(tmp_path)
    folders = [str(base)]
    assert pf.resolve_name("derain", folders) == base / "derain"
    assert pf.resolve_name("./mine.safetensors", folders) == base / "mine.safetensors"
    torch.save({"model": PromptTuner().state_dict()}, base / "PromptTunner.pt")
    assert pf.resolve_name("PromptTunner.pt", folders, "selector") == base / "PromptTunner.pt"
    assert pf.resolve_name("PromptTunner.pt", folders, "plugin") is None  # the kind must match too
    # links the owner placed in the folder are followed, as ComfyUI does in its model folders
    (base / "team").mkdir()
    (base / "team" / "alias").symlink_to(base / "derain")
    (base / "linked").symlink_to(outside / "evil")
    assert pf.resolve_name("team/alias", folders) == base / "team" / "alias"
    assert pf.resolve_name("linked", folders) == base / "linked"
    refused = [
        str(outside / "evil"), str(outside / "evil_file.safetensors"),  # absolute paths to real plugins
        str(base / "derain"),  # even an absolute path inside: names only
        "../elsewhere/evil", "../../elsewhere/evil", "derain/../../elsewhere/evil", "..\\elsewhere\\evil",
        "/etc/passwd", "../../../../../../etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\x",
        "derain/tpb.pt", "derain/scb", "team", "mine.safetensors/..", "", "  ", ".", "derain\x00",
        None, 3, ["derain"], "no_such_plugin",
    ]
    for name in refused:
        assert pf.resolve_name(name, folders) is None, name


def test_scan_lists_what_resolves(tmp_path):
    base, outside = _plugin_tree(tmp_path)
    torch.save({"model": PromptTuner().state_dict()}, base / "PromptTunner.pt")
    (base / "mine.safetensors.optim.pt").write_bytes(b"optimizer state")
    (base / "shared").symlink_to(outside)  # a linked folder of plugins
    (base / "alias").symlink_to(base / "derain")
    scan = pf.scan_plugin_folders([str(base)])
    assert scan.plugins == ["alias", "derain", "mine.safetensors", "shared/evil", "shared/evil_file.safetensors"]
    assert scan.selectors == ["PromptTunner.pt"]
    for name in scan.plugins:
        assert pf.resolve_name(name, [str(base)]) == base / name, name


def _scan_in_thread(folders, **kw):
    """Run the scan in a daemon thread so that a regression (an endless walk) fails here instead of
    hanging the suite; the bound (60 s) is a guard only, the assertions are on what the scan visited."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("scan", pf.scan_plugin_folders(folders, **kw)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the folder scan did not end"
    return out["scan"]


def test_symlink_loops_end_the_scan(tmp_path):
    """Two loops (a link to the folder's root, one to a sibling), a self link, and a linked folder reached
    twice. os.walk(followlinks=True), the previous scan, never ended here (checked: 500,000 folders and
    still walking after 60 s). Each real folder is listed once, under its real name first."""
    import time

    base = tmp_path / "diff_plugin"
    write_released_plugin(base / "a", "derain", seed=0)
    (base / "b").mkdir()
    (base / "a" / "up").symlink_to(base)
    (base / "b" / "sideways").symlink_to(base / "a")
    (base / "b" / "self").symlink_to(base / "b")
    outside = tmp_path / "outside"
    write_released_plugin(outside / "c", "dehaze", seed=1)
    (outside / "c" / "back").symlink_to(base)
    (base / "b" / "out1").symlink_to(outside)
    (base / "b" / "out2").symlink_to(outside)
    real_dirs = {str(p.resolve()) for root in (base, outside) for p in [root, *root.rglob("*")] if p.is_dir()}
    started = time.perf_counter()
    scan = _scan_in_thread([str(base)])
    elapsed = time.perf_counter() - started
    assert scan.plugins == ["a/derain", "b/out1/c/dehaze"] and not scan.truncated
    assert scan.dirs_visited <= len(real_dirs), (scan.dirs_visited, len(real_dirs))
    print(f"loop scan: {scan.dirs_visited} folders in {elapsed * 1000:.1f} ms")


def test_scan_depth_and_folder_count_are_bounded(tmp_path):
    base = tmp_path / "diff_plugin"
    deep = base.joinpath(*[f"d{i}" for i in range(pf.MAX_SCAN_DEPTH + 3)])
    write_released_plugin(deep, "too_deep", seed=0)
    write_released_plugin(base / "d0", "shallow", seed=1)
    scan = _scan_in_thread([str(base)])
    assert scan.plugins == ["d0/shallow"]
    assert scan.dirs_visited <= pf.MAX_SCAN_DEPTH + 1
    for i in range(50):
        (base / "wide" / f"w{i}").mkdir(parents=True)
    small = _scan_in_thread([str(base)], max_dirs=10)
    assert small.truncated and small.dirs_visited == 10
