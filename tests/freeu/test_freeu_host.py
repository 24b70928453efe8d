"""Host tests: PlugKitFreeU sampling a tiny SD1.x model (and refusing a tiny Flux) inside ComfyUI."""
from __future__ import annotations

import logging

import pytest
import torch

TOL = 1e-5
STEPS = 3


@pytest.fixture(scope="module")
def env(comfy):
    """(tiny SD1.x model, 16x16 latent, positive, negative), shared: nodes never modify the model."""
    from tools.fixtures.models import build_model, random_conditioning

    latent = torch.zeros(1, 4, 16, 16)
    return build_model(seed=0), latent, random_conditioning(seed=1), random_conditioning(seed=2)


@pytest.fixture(scope="module")
def memo():
    """Results of runs several tests compare against (CPU sampling is deterministic)."""
    return {}


def cached(memo, key, fn):
    if key not in memo:
        memo[key] = fn()
    return memo[key]


def node():
    from plugkit.nodes.freeu.nodes import PlugKitFreeU

    return PlugKitFreeU


def ours(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2, **kw):
    return node().execute(model=model, b1=b1, b2=b2, s1=s1, s2=s2, **kw).result[0]


def run(env, model, latent=None, **kw):
    from tools.fixtures.models import sample

    _, lat, pos, neg = env
    return sample(model, lat if latent is None else latent, pos, neg, steps=kw.pop("steps", STEPS), **kw)


def output_patches(m):
    return m.model_options["transformer_options"].get("patches", {}).get("output_block_patch", [])


def our_patch(m):
    found = [p for p in output_patches(m) if getattr(p, "plugkit_freeu", False)]
    assert len(found) == 1
    return found[0]


# -- parity with core ------------------------------------------------------------------------------
def base_run(env, memo):
    return cached(memo, "base", lambda: run(env, env[0]))


def core_v2_run(env, memo, comfy_nodes):
    core = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(env[0], 1.3, 1.4, 0.9, 0.2)[0]
    return cached(memo, "core_v2", lambda: run(env, core))


def ours_run(env, memo):
    return cached(memo, "ours_v2", lambda: run(env, ours(env[0])))


def test_v2_matches_core_freeu_v2(env, memo, comfy_nodes):
    core = core_v2_run(env, memo, comfy_nodes)
    assert (core - base_run(env, memo)).abs().max() > 1e-2  # FreeU really acts on this model
    assert (ours_run(env, memo) - core).abs().max() <= TOL


def test_v2_matches_core_on_non_square_latent(env, comfy_nodes):
    model = env[0]
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    core = run(env, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.5, 1.6, 0.9, 0.2)[0], latent)
    mine = run(env, ours(model, 1.5, 1.6, 0.9, 0.2), latent)
    assert (mine - core).abs().max() <= TOL
    assert torch.isfinite(mine).all() and mine.abs().max() > 0.1


def test_v1_matches_core_freeu(env, memo, comfy_nodes):
    model = env[0]
    base = base_run(env, memo)
    core = run(env, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU"]().patch(model, 1.1, 1.2, 0.9, 0.2)[0])
    mine = run(env, ours(model, 1.1, 1.2, 0.9, 0.2, version="v1"))
    assert (core - base).abs().max() > 1e-2
    assert (mine - core).abs().max() <= TOL


def test_preset_matches_core_with_same_values(env, comfy_nodes):
    model = env[0]
    core = run(env, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.5, 1.6, 0.9, 0.2)[0])
    mine = run(env, ours(model, 9, 9, 9, 9, preset="SD1.5"))  # the preset overrides the sliders
    assert (mine - core).abs().max() <= TOL
    auto = our_patch(ours(model, 9, 9, 9, 9, preset="auto"))
    assert (auto.b1, auto.b2, auto.s1, auto.s2) == (1.5, 1.6, 0.9, 0.2)  # tiny model is an SD15 config


def test_identity_factors_reproduce_unpatched_exactly(env, memo):
    assert torch.equal(run(env, ours(env[0], 1.0, 1.0, 1.0, 1.0, version="v2")), base_run(env, memo))


def test_stages_by_channel_count(env, monkeypatch):
    from plugkit.nodes.freeu.hooks import FreeUPatch

    seen = []
    real = FreeUPatch._apply

    def spy(self, h, hsp, b, s, o):
        seen.append((o["block"][1], h.shape[1], b, s))
        return real(self, h, hsp, b, s, o)

    monkeypatch.setattr(FreeUPatch, "_apply", spy)
    run(env, ours(env[0]), steps=1, cfg=1.0)
    mc = 32
    assert sorted({(blk, c) for blk, c, _, _ in seen}) == (
        [(i, 4 * mc) for i in range(7)] + [(i, 2 * mc) for i in range(7, 10)])
    assert {(c, b, s) for _, c, b, s in seen} == {(4 * mc, 1.3, 0.9), (2 * mc, 1.4, 0.2)}


def tiny_sdxl():
    """A tiny SDXL-structured U-Net (3 levels, linear transformers, context 2048, ADM) as ComfyUI's SDXL."""
    import comfy.model_patcher
    import comfy.supported_models

    from tools.fixtures.models import passthrough_init, random_init

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
           "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
           "context_dim": 2048, "num_head_channels": 32, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.supported_models.SDXL(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, 0)
    passthrough_init(model.diffusion_model)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_sdxl_layout_matches_core_and_uses_sdxl_stages(comfy, comfy_nodes, monkeypatch):
    from plugkit.nodes.freeu.hooks import FreeUPatch
    from tools.fixtures.models import random_conditioning, sample

    model = tiny_sdxl()
    gen = torch.Generator().manual_seed(5)
    pos = random_conditioning(dim=2048, seed=1, pooled_output=torch.randn(1, 1280, generator=gen))
    neg = random_conditioning(dim=2048, seed=2, pooled_output=torch.randn(1, 1280, generator=gen))
    latent = torch.zeros(1, 4, 16, 16)
    core = sample(comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.3, 1.4, 0.9, 0.2)[0],
                  latent, pos, neg, steps=2)
    seen = set()
    real = FreeUPatch._apply
    monkeypatch.setattr(FreeUPatch, "_apply",
                        lambda self, h, hsp, b, s, o: seen.add((o["block"][1], h.shape[1])) or real(self, h, hsp, b, s, o))
    mine = sample(ours(model, preset="auto"), latent, pos, neg, steps=2)  # auto -> SDXL = 1.3/1.4/0.9/0.2
    assert (mine - core).abs().max() <= TOL
    # SDXL's decoder: 4 concats at 4x base channels (blocks 0-3), 3 at 2x (blocks 4-6).
    assert sorted(seen) == [(i, 128) for i in range(4)] + [(i, 64) for i in range(4, 7)]


# -- timestep range --------------------------------------------------------------------------------
def test_range_gates_the_patch(env, monkeypatch):
    import comfy.samplers

    from plugkit.nodes.freeu.hooks import FreeUPatch

    model = env[0]
    applied = []
    real = FreeUPatch._apply
    monkeypatch.setattr(FreeUPatch, "_apply",
                        lambda self, h, hsp, b, s, o: applied.append(float(o["sigmas"][0])) or real(self, h, hsp, b, s, o))
    m = ours(model, start_percent=0.3, end_percent=0.7)
    steps = 6
    run(env, m, steps=steps)
    ms = model.get_model_object("model_sampling")
    lo, hi = ms.percent_to_sigma(0.7), ms.percent_to_sigma(0.3)
    schedule = [float(s) for s in comfy.samplers.calculate_sigmas(ms, "normal", steps)[:-1]]
    inside = {s for s in schedule if lo <= s <= hi}
    assert 0 < len(inside) < len(schedule)
    assert {round(s, 4) for s in applied} == {round(s, 4) for s in inside}
    assert len(applied) == len(inside) * 10  # 10 FreeU concats per step (cond+uncond batched)
    patch = our_patch(m)  # the run's state lived in the run, not on the (shared) patch object
    assert patch.sigma_start == pytest.approx(hi) and patch.sigma_end == pytest.approx(lo)
    assert not hasattr(patch, "suppressed") and not hasattr(patch, "_seen_sigmas")
    assert not any(k.startswith("plugkit_freeu") for k in m.model_options.get("transformer_options", {}))


def test_range_outside_every_step_is_the_plain_model(env, memo):
    base = base_run(env, memo)
    assert torch.equal(run(env, ours(env[0], start_percent=1.0, end_percent=1.0)), base)
    assert (ours_run(env, memo) - base).abs().max() > 1e-2


def test_range_follows_model_sampling_applied_later(env, comfy_nodes, monkeypatch):
    from plugkit.nodes.freeu.hooks import FreeUPatch

    seen = []
    real = FreeUPatch.patch_run
    monkeypatch.setattr(FreeUPatch, "patch_run",
                        lambda self, ms=None, suppressed=False: seen.append(ms) or real(self, ms, suppressed))
    m = ours(env[0], start_percent=0.25, end_percent=0.75)
    m2 = comfy_nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(m, "eps", True)[0]  # zsnr
    run(env, m2, steps=2)
    assert len(seen) == 1
    ms = m2.get_model_object("model_sampling")
    assert seen[0] is ms
    assert ms.percent_to_sigma(0.25) != env[0].get_model_object("model_sampling").percent_to_sigma(0.25)


def test_start_after_end_is_a_clear_error(env):
    with pytest.raises(ValueError, match=r"PlugKitFreeU.*start_percent"):
        ours(env[0], start_percent=0.8, end_percent=0.2)


# -- cond / uncond ---------------------------------------------------------------------------------
def test_apply_to_cond_or_uncond(env, memo):
    model = env[0]
    # cfg == 1: ComfyUI runs only the cond pass.
    base1 = run(env, model, cfg=1.0)
    both1 = run(env, ours(model), cfg=1.0)
    assert torch.equal(run(env, ours(model, apply_to="uncond"), cfg=1.0), base1)
    assert torch.equal(run(env, ours(model, apply_to="cond"), cfg=1.0), both1)
    # cfg > 1: cond-only and uncond-only differ from each other, from both and from none.
    outs = {a: run(env, ours(model, apply_to=a)) for a in ("cond", "uncond")}
    outs["both"] = ours_run(env, memo)
    outs["none"] = base_run(env, memo)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


# -- chaining --------------------------------------------------------------------------------------
def test_second_plugkit_freeu_replaces_the_first(env, memo, caplog):
    model = env[0]
    with caplog.at_level(logging.WARNING):
        chained = ours(ours(model, 1.1, 1.2, 0.5, 0.5), 1.3, 1.4, 0.9, 0.2)
    assert any("replaced" in r.getMessage() for r in caplog.records)
    assert len(output_patches(chained)) == 1
    assert len(chained.get_wrappers("outer_sample", "plugkit_freeu")) == 1
    assert torch.equal(run(env, chained), ours_run(env, memo))
    assert output_patches(model) == []  # the input model is never modified


def test_plugkit_after_core_freeu_replaces_it(env, memo, comfy_nodes, caplog):
    model = env[0]
    core = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.1, 1.2, 0.5, 0.5)[0]
    with caplog.at_level(logging.WARNING):
        chained = ours(core)
    assert any("core FreeU_V2" in r.getMessage() for r in caplog.records)
    assert torch.equal(run(env, chained), ours_run(env, memo))


def test_core_freeu_after_plugkit_wins(env, memo, comfy_nodes, caplog):
    model = env[0]
    core_node = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]()
    chained = core_node.patch(ours(model, 1.1, 1.2, 0.5, 0.5), 1.3, 1.4, 0.9, 0.2)[0]
    with caplog.at_level(logging.WARNING):
        out = run(env, chained)
    assert any("core FreeU" in r.getMessage() and "off for this run" in r.getMessage() for r in caplog.records)
    assert torch.equal(out, core_v2_run(env, memo, comfy_nodes))
    # The suppression was this run's, not the patch object's (clones share it since ComfyUI 0.14):
    # the same object on a model without the later core FreeU runs.
    alone = ours(model, 1.1, 1.2, 0.5, 0.5)
    alone.model_options["transformer_options"]["patches"]["output_block_patch"] = [our_patch(chained)]
    assert torch.equal(run(env, alone), run(env, ours(model, 1.1, 1.2, 0.5, 0.5)))
    assert not torch.equal(run(env, alone), base_run(env, memo))


# -- models without a U-Net decoder -----------------------------------------------------------------
def tiny_flux():
    from tools.fixtures.models import build_tiny_dit

    return build_tiny_dit("flux")


def test_dit_is_refused_with_a_clear_error(comfy, comfy_nodes):
    flux = tiny_flux()
    with pytest.raises(ValueError) as err:
        ours(flux)
    msg = str(err.value)
    assert "PlugKitFreeU" in msg and "Flux" in msg and "U-Net" in msg and "skip" in msg
    with pytest.raises(KeyError):  # what core FreeU_V2 does on the same model
        comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(flux, 1.3, 1.4, 0.9, 0.2)
    assert "pass through" in msg  # the error names the way out for mixed-model graphs


def test_dit_passes_through_unchanged_when_asked(comfy, caplog):
    """Mixed-model graphs: with other_models='pass through' a DiT goes on untouched, with a warning."""
    flux = tiny_flux()
    before = (len(flux.patches), repr(sorted(flux.model_options.get("transformer_options", {}))))
    with caplog.at_level(logging.WARNING):
        out = ours(flux, other_models="pass through")
    assert out is flux
    assert (len(flux.patches), repr(sorted(flux.model_options.get("transformer_options", {})))) == before
    assert any("PlugKitFreeU" in r.getMessage() and "Flux" in r.getMessage() and "without FreeU" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="other_models"):
        ours(flux, other_models="ignore")


def test_pass_through_leaves_u_nets_patched(env, memo):
    """The option only concerns models without a U-Net: an SD1.x model still gets FreeU."""
    assert torch.equal(run(env, ours(env[0], other_models="pass through")), ours_run(env, memo))


# -- registration ----------------------------------------------------------------------------------
def test_node_registered_with_tooltips(comfy):
    from plugkit.nodes.extension import all_nodes

    assert node() in all_nodes()
    schema = node().define_schema()
    assert schema.node_id == "PlugKitFreeU" and schema.category == "PlugKit/FreeU"
    names = [i.id for i in schema.inputs]
    assert names[:8] == ["model", "b1", "b2", "s1", "s2", "version", "start_percent", "end_percent"]
    assert all(i.tooltip for i in schema.inputs)
    assert all(i.optional for i in schema.inputs[8:])


# -- float inputs: NaN and infinity never pass (ComfyUI's min/max checks let NaN through) -----------
@pytest.mark.parametrize("name", ["b1", "b2", "s1", "s2", "start_percent", "end_percent"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_inputs_are_refused(env, name, bad):
    kw = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "start_percent": 0.0, "end_percent": 1.0, name: bad}
    with pytest.raises(ValueError, match=rf"^PlugKitFreeU: input '{name}' must be a finite number"):
        node().execute(model=env[0], **kw)
    with pytest.raises(ValueError, match=rf"^PlugKitFreeU: input '{name}'"):  # a preset ignores b/s, not NaN
        node().execute(model=env[0], **kw, preset="SD1.5")


def test_out_of_range_inputs_are_refused(env):
    with pytest.raises(ValueError, match=r"PlugKitFreeU: input 'end_percent' must be between 0 and 1"):
        ours(env[0], end_percent=1.5)
    with pytest.raises(ValueError, match=r"PlugKitFreeU: input 'threshold'"):
        ours(env[0], threshold=0)
    with pytest.raises(ValueError, match=r"PlugKitFreeU: input 'apply_to'"):
        ours(env[0], apply_to="positive")


# -- presets -----------------------------------------------------------------------------------------
def test_sdxl_sweep_preset_runs_with_v1(env, comfy_nodes, caplog):
    """The sweep's values were tuned with diffusers' constant-factor FreeU: the preset runs v1 whatever
    `version` says (before: v2, which the values were never tuned for)."""
    model = env[0]
    core_v1 = run(env, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU"]().patch(model, 1.1, 1.2, 0.6, 0.4)[0])
    core_v2 = run(env, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.1, 1.2, 0.6, 0.4)[0])
    assert (core_v1 - core_v2).abs().max() > 1e-3
    with caplog.at_level(logging.INFO):
        m = ours(model, 9, 9, 9, 9, preset="SDXL sweep", version="v2")
    assert (run(env, m) - core_v1).abs().max() <= TOL
    assert any("tuned with FreeU v1" in r.getMessage() for r in caplog.records)


def tiny_x4_upscaler():
    """A tiny SD x4 upscaler (ComfyUI's SD_X4Upscaler config and model class); not sampled here."""
    import comfy.model_patcher
    import comfy.supported_models

    from tools.fixtures.models import random_init, tiny_unet_config

    cfg = tiny_unet_config(in_channels=7, context_dim=1024, use_linear_in_transformer=True)
    config = comfy.supported_models.SD_X4Upscaler(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, 0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_x4_upscaler_resolution_aware_reference_is_its_4x_latent(comfy):
    """The x4 upscaler's VAE downsamples by 4 (512 px crops -> 128x128 latents). Before: 512 // 8 = 64,
    so at its native latent the resolution-aware box was doubled."""
    model = tiny_x4_upscaler()
    m = ours(model, preset="SD2.1", threshold=1, threshold_mode="resolution-aware")
    patch = our_patch(m)
    assert patch.reference_latent == (128, 128)
    assert patch.threshold_for({"original_shape": [1, 4, 128, 128]}) == (1, 1)
    assert patch.threshold_for({"original_shape": [1, 4, 256, 256]}) == (2, 2)
    with pytest.raises(ValueError, match=r"'auto'.*SD_X4Upscaler"):
        ours(model, preset="auto")


# -- an earlier output-block patch that hands on hsp=None -------------------------------------------
def test_freeu_after_a_patch_that_consumes_the_skip(env):
    """Core SUPIR in newer ComfyUI returns hsp=None from its output-block patch. FreeU after such a
    patch scales the backbone and leaves the (absent) skip alone. A third patch hands the skip back so
    that this ComfyUI's concat still runs; the result is FreeU with s = 1. Before: a crash."""
    model = env[0]
    stack = []

    def take(h, hsp, to):
        stack.append(hsp)
        return h, None

    def give(h, hsp, to):
        assert hsp is None
        return h, stack.pop()

    m = model.clone()
    m.set_model_output_block_patch(take)
    m = ours(m)
    m.set_model_output_block_patch(give)
    out = run(env, m)
    assert torch.equal(out, run(env, ours(model, 1.3, 1.4, 1.0, 1.0)))
    assert not torch.equal(out, run(env, model))
