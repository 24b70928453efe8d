"""Diff-Plugin in a real ComfyUI (in-process, CPU, tiny SD1.x U-Net with 32 base channels, so the
plugins here have a 32-channel SCB; the TPB and the SCB's structure are the released ones).

CLIP vision and the VAE are real ComfyUI objects (``comfy.clip_vision.ClipVisionModel`` shaped like
ViT-L/14 with 2 layers, ``comfy.sd.VAE`` with SD's layout and 32 channels, from tools.fixtures.models), built
once per module; tests/e2e runs the real loaders on full-size files."""
from __future__ import annotations

import pytest
import torch

from diff_plugin_testlib import random_state, write_released_plugin


def make_handle(name="derain", seed=0, zero_outputs=False, channels=32):
    from plugkit.nodes.diff_plugin.hooks import PluginHandle
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    plugin = TaskPlugin(name, scb_channels=channels)
    plugin.load_state_dict(random_state(plugin, seed))
    if zero_outputs:
        plugin.scb.zero_output_convs()
    return PluginHandle(plugin)


def image(seed=0, size=128):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=gen)


def plain_conditioning(cond):
    return [[cond[0][0].clone(), {}]]


@pytest.fixture
def setup(comfy, tiny_model, tiny_clip_vision, tiny_vae):
    return tiny_model, tiny_clip_vision, tiny_vae, image()


def run(model, positive, latent, steps=4, sampler="euler", **kw):
    from tools.fixtures.models import sample

    return sample(model, latent["samples"], positive, [], steps=steps, cfg=1.0, sampler=sampler, **kw)


def test_apply_outputs_fp_as_context_and_start_latent(setup):
    from plugkit.nodes.diff_plugin.nodes import PlugKitApplyTaskPlugin

    model, cv, vae, img = setup
    handle = make_handle()
    before = repr(model.model_options)
    m, positive, latent = PlugKitApplyTaskPlugin.execute(model=model, plugin=handle, clip_vision=cv, vae=vae,
                                                         image=img, resize="none").result
    assert m is not model and repr(model.model_options) == before  # incoming model untouched
    fp = positive[0][0]
    expected = handle.plugin.tpb(cv.encode_image(img)["last_hidden_state"][:, 1:])
    assert fp.shape == (1, 256, 768)
    torch.testing.assert_close(fp, expected)
    assert positive[0][1]["control"].handle is handle
    torch.testing.assert_close(latent["samples"], vae.encode(img))
    _, _, noise_start = PlugKitApplyTaskPlugin.execute(model=model, plugin=make_handle("lowlight"), clip_vision=cv,
                                                       vae=vae, image=img, resize="none").result
    assert noise_start["samples"].abs().max() == 0 and noise_start["samples"].shape == latent["samples"].shape


def test_fp_replaces_the_context_in_the_unet(setup):
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin

    model, cv, vae, img = setup
    m, positive, latent = apply_task_plugin(model, make_handle(), cv, vae, img, resize="none")
    seen = []

    def capture(q, k, v, extra_options):
        seen.append(k.detach().clone())
        return q, k, v

    m.set_model_attn2_patch(capture)
    run(m, positive, latent, steps=1)
    assert seen, "no cross-attention ran"
    for k in seen:
        torch.testing.assert_close(k, positive[0][0])


def test_residuals_land_on_the_last_three_skips_only(setup):
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin

    model, cv, vae, img = setup
    handle = make_handle(seed=5)
    m, positive, latent = apply_task_plugin(model, handle, cv, vae, img, resize="none")

    def skips(m, cond):
        seen, sigmas = {}, []

        def patch(h, hsp, transformer_options):
            block = transformer_options["block"][1]
            if block not in seen:
                seen[block] = hsp.detach().clone()
                sigmas.append(transformer_options["sigmas"].clone())
            return h, hsp

        m = m.clone()
        m.set_model_output_block_patch(patch)
        run(m, cond, latent, steps=1)
        return seen, sigmas[0]

    with_plugin, sigma = skips(m, positive)
    plain, _ = skips(model, plain_conditioning(positive))
    assert sorted(with_plugin) == list(range(12))
    for block in range(9):
        assert torch.equal(with_plugin[block], plain[block]), f"output block {block} skip changed"
    cond_latent = m.get_model_object("latent_format").process_in(latent["samples"])
    t = m.get_model_object("model_sampling").timestep(sigma)
    with torch.no_grad():
        residuals = handle.plugin.scb(cond_latent, t, positive[0][0])
    for block, residual in zip((11, 10, 9), residuals):
        diff = with_plugin[block] - plain[block]
        assert residual.abs().max() > 1e-3
        torch.testing.assert_close(diff, residual, rtol=1e-4, atol=1e-5)


def test_zero_initialised_scb_equals_plain_sampling_with_fp(setup):
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin

    model, cv, vae, img = setup
    m, positive, latent = apply_task_plugin(model, make_handle(zero_outputs=True), cv, vae, img, resize="none")
    out = run(m, positive, latent, steps=2, seed=3)
    ref = run(model, plain_conditioning(positive), latent, steps=2, seed=3)
    assert torch.equal(out, ref)
    m2, positive2, _ = apply_task_plugin(model, make_handle(seed=2), cv, vae, img, resize="none")
    assert not torch.allclose(run(m2, positive2, latent, steps=2, seed=3), ref)  # a trained SCB does act


def test_weight_patches_still_apply_and_the_model_is_not_mutated(setup):
    """A LoRA-style weight patch on the incoming model (ModelPatcher.add_patches, what LoraLoader uses)
    still acts under the plugin, exactly as if the weights had been changed; the incoming patcher keeps
    its patches and options."""
    import copy

    from plugkit.nodes.diff_plugin.nodes import PlugKitApplyTaskPlugin
    from tools.fixtures.models import build_model

    model, cv, vae, img = setup
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = model.model.state_dict()[key]
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.2
    patched = model.clone()
    patched.add_patches({key: (delta,)}, 1.0)
    patches_before = {k: list(v) for k, v in patched.patches.items()}
    options_before = copy.deepcopy(patched.model_options)
    handle = make_handle(seed=4)

    def plugin_run(m):
        m2, positive, latent = PlugKitApplyTaskPlugin.execute(model=m, plugin=handle, clip_vision=cv, vae=vae,
                                                              image=img, resize="none").result
        return run(m2, positive, latent, steps=2, seed=1)

    with_patch = plugin_run(patched)
    baked = build_model(seed=0)  # the same tiny model with the delta written into its weights
    with torch.no_grad():
        baked.model.state_dict()[key].add_(delta)
    torch.testing.assert_close(with_patch, plugin_run(baked), rtol=1e-5, atol=1e-5)
    assert (with_patch - plugin_run(model)).abs().max() > 1e-3  # the patch matters
    assert {k: list(v) for k, v in patched.patches.items()} == patches_before
    assert patched.model_options.keys() == options_before.keys()
    assert patched.model_options["transformer_options"].keys() == options_before["transformer_options"].keys()
    assert not patched.object_patches


def test_control_api_copy_models_chain_and_cleanup(setup):
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin

    model, cv, vae, img = setup
    h1, h2 = make_handle(seed=1), make_handle(seed=2)
    _, pos1, latent = apply_task_plugin(model, h1, cv, vae, img, resize="none")
    _, pos2, _ = apply_task_plugin(model, h2, cv, vae, img, resize="none")
    c1, c2 = pos1[0][1]["control"], pos2[0][1]["control"]
    copied = c1.copy()
    assert copied is not c1 and copied.handle is h1 and copied.cond_latent is c1.cond_latent
    assert h1.patcher in c1.get_models()
    chained = c2.copy().set_previous_controlnet(c1.copy())
    assert {id(p) for p in chained.get_models()} == {id(h1.patcher), id(h2.patcher)}
    ms = model.get_model_object("model_sampling")

    class _M:
        model_sampling = ms

    sigma = torch.tensor([5.0])
    x = torch.zeros_like(latent["samples"])
    for c in (c1, c2, chained):
        c.pre_run(_M, ms.percent_to_sigma)
    cond = {"c_crossattn": pos1[0][0]}
    a = c1.get_control(x, sigma, cond, 1, {})["output"]
    b = c2.get_control(x, sigma, cond, 1, {})["output"]
    ab = chained.get_control(x, sigma, cond, 1, {})["output"]
    assert len(ab) == 12 and all(o is None for o in ab[3:])
    for i in range(3):
        torch.testing.assert_close(ab[i], a[i] + b[i])
    chained.cleanup()
    assert chained.model_sampling_current is None and chained.previous_controlnet.model_sampling_current is None


def test_wrong_model_family_is_a_clear_error(comfy, setup):
    from plugkit.nodes.diff_plugin.runs import apply_task_plugin
    from tools.fixtures.models import build_model, tiny_unet_config

    model, cv, vae, img = setup
    sd2_like = build_model(tiny_unet_config(context_dim=1024))
    with pytest.raises(ValueError, match="PlugKitApplyTaskPlugin: input 'model' is not an SD 1.x U-Net"):
        apply_task_plugin(sd2_like, make_handle(), cv, vae, img, resize="none")
    with pytest.raises(ValueError, match="320"):
        apply_task_plugin(model, make_handle(channels=320), cv, vae, img, resize="none")


def test_loader_finds_released_and_safetensors_plugins(comfy, tmp_path):
    import folder_paths
    from plugkit.nodes.diff_plugin import plugin_files as pf
    from plugkit.nodes.diff_plugin.nodes import PlugKitTaskPluginLoader
    from plugkit.nodes.diff_plugin.model_folders import plugin_folders, scan_folder
    from plugkit.nodes.diff_plugin.plugin_selector import PromptTuner
    from plugkit.nodes.diff_plugin.task_plugin import TaskPlugin

    plugin_folders()
    folder_paths.add_model_folder_path("diff_plugin", str(tmp_path))
    try:
        _, scb, _ = write_released_plugin(tmp_path / "pre-trained", "desnow", seed=4, module_prefix=True)
        pf.save_plugin(TaskPlugin("mine"), tmp_path / "mine.safetensors")
        (tmp_path / "pre-trained" / "plugin_selector").mkdir()
        torch.save({"model": PromptTuner().state_dict()}, tmp_path / "pre-trained" / "plugin_selector" / "PromptTunner.pt")
        (tmp_path / "mine.safetensors.optim.pt").write_bytes(b"optimizer state, not a selector")
        plugins, selectors = scan_folder()
        assert "pre-trained/desnow" in plugins and "mine.safetensors" in plugins
        assert "pre-trained/plugin_selector/PromptTunner.pt" in selectors
        assert not any(s.endswith(".optim.pt") for s in selectors)
        schema = PlugKitTaskPluginLoader.define_schema()
        assert "pre-trained/desnow" in schema.inputs[0].options
        handle = PlugKitTaskPluginLoader.execute(plugin_name="pre-trained/desnow").result[0]
        assert handle.name == "desnow"
        assert torch.equal(handle.plugin.scb.state_dict()["controlnet_cond_embedding.weight"],
                           scb["controlnet_cond_embedding.weight"])
        assert PlugKitTaskPluginLoader.execute(plugin_name="mine.safetensors").result[0].name == "mine"
        with pytest.raises(ValueError, match="PlugKitTaskPluginLoader.*not found"):
            PlugKitTaskPluginLoader.execute(plugin_name="nope")
        (tmp_path / "pre-trained" / "desnow" / "tpb.pt").write_bytes(b"broken")
        with pytest.raises(ValueError, match="PlugKitTaskPluginLoader: input 'plugin_name'.*tpb.pt"):
            PlugKitTaskPluginLoader.execute(plugin_name="pre-trained/desnow")
    finally:
        folder_paths.folder_names_and_paths["diff_plugin"][0].remove(str(tmp_path))


def test_chain_runs_official_schedule(setup, monkeypatch):
    from plugkit.nodes.diff_plugin.nodes import PlugKitRunPluginChain

    model, cv, vae, img = setup
    calls, encoded = [], []
    real_encode = vae.encode

    def spy_encode(pixels):  # the real VAE's encode, counted: one encode of the input per plugin
        encoded.append(pixels.detach().clone())
        return real_encode(pixels)

    monkeypatch.setattr(vae, "encode", spy_encode)

    def count(apply_model, args):
        calls.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(count)
    handles = [make_handle("derain", seed=1), make_handle("dehaze", seed=2)]
    out = PlugKitRunPluginChain.execute(model=m, plugins=handles, clip_vision=cv, vae=vae, image=img, resize="none", seed=1,
                                        steps=3, later_steps=2, sampler_name="euler", scheduler="normal").result[0]
    assert len(calls) == 3 + 2
    assert len(encoded) == 2
    torch.testing.assert_close(encoded[0], img)  # the first plugin reads the input image ...
    assert not torch.allclose(encoded[1], img, atol=1e-3)  # ... the second one the first plugin's result
    assert out.shape == img.shape and torch.isfinite(out).all()
    same = PlugKitRunPluginChain.execute(model=m, plugins=[], clip_vision=cv, vae=vae, image=img, resize="none").result[0]
    assert same is img


def test_chain_runs_one_plugin_with_the_official_sampler_by_default(setup):
    """A single loaded plugin on the 'plugin' input, default sampler (official): one model call per step,
    the official grid (first call at t = 999), and a clear error when nothing is connected."""
    from plugkit.nodes.diff_plugin.runs import OFFICIAL_SAMPLER
    from plugkit.nodes.diff_plugin.nodes import PlugKitRunPluginChain

    model, cv, vae, img = setup
    timesteps = []

    sampling = model.get_model_object("model_sampling")

    def spy(apply_model, args):  # args["timestep"] is the sigma; the U-Net gets sampling.timestep(sigma)
        timesteps.append(float(sampling.timestep(args["timestep"])[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    m = model.clone()
    m.set_model_unet_function_wrapper(spy)
    handle = make_handle("derain", seed=1)
    schema = PlugKitRunPluginChain.define_schema()
    assert next(i for i in schema.inputs if i.id == "sampler_name").default == OFFICIAL_SAMPLER
    out = PlugKitRunPluginChain.execute(model=m, plugin=handle, clip_vision=cv, vae=vae, image=img, resize="none", steps=4).result[0]
    assert [round(t) for t in timesteps] == [999, 749, 500, 250]  # linspace(0, 999, 5) rounded, reversed
    other = PlugKitRunPluginChain.execute(model=model, plugin=handle, clip_vision=cv, vae=vae, image=img, resize="none", steps=4,
                                          sampler_name="uni_pc_bh2").result[0]
    assert out.shape == img.shape and (out - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match="PlugKitRunPluginChain: connect 'plugins'.*or 'plugin'"):
        PlugKitRunPluginChain.execute(model=model, clip_vision=cv, vae=vae, image=img, resize="none")


def test_selector_node_picks_the_plugin_built_for_the_instruction(sd15_full, tiny_clip_vision, tmp_path):
    """Plugins whose Fp max-pools to directions dual to the instructions' pooled text embeddings
    (from the real SD text encoder): the selector must pick the matching one(s), in order."""
    import folder_paths
    from plugkit.nodes.diff_plugin.nodes import PlugKitPluginSelector
    from plugkit.nodes.diff_plugin.model_folders import plugin_folders
    from plugkit.nodes.diff_plugin.runs import pooled_text
    from plugkit.nodes.diff_plugin.plugin_selector import PromptTuner

    _, clip, _ = sd15_full
    instructions = ["remove the rain", "remove the snow", "remove the haze"]
    texts = torch.cat([pooled_text(clip, t) for t in instructions])  # [3, 768]
    assert texts.shape == (3, 768)
    null = pooled_text(clip, " ")
    u = torch.cat([texts, null])
    dual = torch.linalg.pinv(u).T  # <dual_i, u_j> = delta_ij
    handles = []
    for i, name in enumerate(["derain", "desnow", "dehaze"]):
        h = make_handle(name, seed=i)
        target = dual[i] - 0.2 * sum(dual[j] for j in range(3) if j != i)
        with torch.no_grad():
            h.plugin.tpb.visual_projection[6].weight.zero_()
            h.plugin.tpb.visual_projection[6].bias.copy_(target)  # every token of Fp = target
        handles.append(h)
    tuner = PromptTuner()
    with torch.no_grad():
        for lin in (tuner.proj_v, tuner.proj_t):
            lin.weight.copy_(torch.eye(768))
            lin.bias.zero_()
    (tmp_path / "plugin_selector").mkdir()
    torch.save({"model": {"module." + k: v for k, v in tuner.state_dict().items()}},
               tmp_path / "plugin_selector" / "PromptTunner.pt")
    plugin_folders()
    folder_paths.add_model_folder_path("diff_plugin", str(tmp_path))
    try:
        cv, img = tiny_clip_vision, image(size=64)
        run_sel = lambda text: PlugKitPluginSelector.execute(  # noqa: E731
            clip=clip, clip_vision=cv, image=img, resize="none", instruction=text, selector_name="plugin_selector/PromptTunner.pt",
            plugin_1=handles[0], plugin_2=handles[1], plugin_3=handles[2])
        out = run_sel("remove the haze")
        chosen, report = out.result
        assert [h.name for h in chosen] == ["dehaze"]
        assert "dehaze" in report and "derain" in report and "null" in report and "selected: dehaze" in report
        assert out.ui is not None
        chosen, _ = run_sel("remove the rain").result
        assert [h.name for h in chosen] == ["derain"]
        with pytest.raises(ValueError, match="PlugKitPluginSelector: connect at least one"):
            PlugKitPluginSelector.execute(clip=clip, clip_vision=cv, image=img, resize="none", instruction="x",
                                          selector_name="plugin_selector/PromptTunner.pt")
    finally:
        folder_paths.folder_names_and_paths["diff_plugin"][0].remove(str(tmp_path))
