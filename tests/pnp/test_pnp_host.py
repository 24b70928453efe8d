"""Plug-and-Play nodes in a real ComfyUI (CPU, tiny SD1.x-structured U-Net, 16x16 latents)."""
import dataclasses
import types

import pytest
import torch


def _sample(model, env, latent=None, positive=None, negative=None, cfg=3.0, sampler="ddim",
            scheduler="ddim_uniform", **kw):
    from tools.fixtures.models import sample

    lat = env["inverted"]["samples"] if latent is None else latent
    return sample(model, lat, positive or env["target_cond"], negative or env["negative"], steps=env["steps"],
                  cfg=cfg, sampler=sampler, scheduler=scheduler, add_noise=False, **kw)


def _inject(model, env, features=0.8, attention=0.5, **kw):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInject

    return PlugKitPnPInject.execute(model=model, pnp_source=env["source"], feature_injection=features,
                                    attention_injection=attention, **kw).result[0]


# ---- inversion -------------------------------------------------------------------------------

def test_invert_outputs_trajectory_latent_and_source_inputs(pnp_env):
    import comfy.samplers

    env = pnp_env
    src, inv = env["source"], env["inverted"]["samples"]
    model = env["model"]
    ms = model.get_model_object("model_sampling")
    expected = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", env["steps"]).float()
    assert torch.equal(src.trajectory.sigmas, expected)
    assert src.trajectory.latents.shape == (expected.numel(), 1, 4, 16, 16)
    base = model.model
    assert torch.allclose(src.trajectory.latents[-1], base.process_latent_in(env["latent"]))
    assert torch.allclose(inv, base.process_latent_out(src.trajectory.latents[0]))
    # the latent at the top really is noisy: its scale follows sigma_max, unlike the clean latent
    assert float(src.trajectory.latents[0].std()) > 5 * float(src.trajectory.latents[-1].std())
    assert torch.equal(src.model_kwargs["c_crossattn"], env["source_cond"][0][0])
    assert src.family == "SD15" and src.decoder_blocks == 12


def test_reconstruction_error_decreases_with_inversion_steps(pnp_env):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    env = pnp_env
    errors = []
    for inversion_steps in (5, 10, 20):
        _, inv = PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]},
                                          conditioning=env["source_cond"], steps=5,
                                          inversion_steps=inversion_steps).result
        rec = _sample(env["model"], env, latent=inv["samples"], positive=env["source_cond"],
                      negative=env["source_cond"], cfg=1.0)
        errors.append(float((rec - env["latent"]).pow(2).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2], errors


def test_invert_works_for_v_prediction_through_model_sampling(pnp_env, comfy_nodes):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    env = pnp_env
    vmodel = comfy_nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(env["model"], "v_prediction", False)[0]
    src, inv = PlugKitPnPInvert.execute(model=vmodel, samples={"samples": env["latent"]},
                                        conditioning=env["source_cond"], steps=5, inversion_steps=5).result
    assert torch.isfinite(inv["samples"]).all()
    assert not torch.allclose(inv["samples"], env["inverted"]["samples"], atol=1e-2)
    rec = _sample(vmodel, env, latent=inv["samples"], positive=env["source_cond"], negative=env["source_cond"], cfg=1.0)
    assert torch.isfinite(rec).all()


# ---- exactness -------------------------------------------------------------------------------

def test_zero_injection_reproduces_plain_sampling(pnp_env):
    env = pnp_env
    plain = _sample(env["model"], env)
    none = _sample(_inject(env["model"], env, 0.0, 0.0), env)
    assert (none - plain).abs().max() <= 1e-5
    # hooks installed, but windows shorter than one step: the plain batch runs every step
    empty = _sample(_inject(env["model"], env, 0.1, 0.1), env)
    assert (empty - plain).abs().max() <= 1e-5
    assert torch.equal(empty, plain)
    injected = _sample(_inject(env["model"], env), env)
    assert (injected - plain).abs().max() > 1e-2


def test_first_step_prediction_unchanged_when_target_prompt_is_source_prompt(pnp_env):
    env = pnp_env
    kw = dict(positive=env["source_cond"], negative=env["source_cond"], cfg=1.0, start_step=0, last_step=1,
              force_full_denoise=False)
    plain = _sample(env["model"], env, **kw)
    pnp = _sample(_inject(env["model"], env, 1.0, 1.0), env, **kw)
    scale = float(plain.abs().max())
    assert (pnp - plain).abs().max() <= 1e-5 * max(scale, 1.0)
    # with another target prompt, the first step does change
    kw2 = dict(kw, positive=env["target_cond"])
    assert (_sample(_inject(env["model"], env, 1.0, 1.0), env, **kw2) - _sample(env["model"], env, **kw2)).abs().max() > 1e-3


def _capture_run(env, features, attention):
    """Sample with injection while capturing block-4 residual features and attn1 q/k/v per call."""
    import comfy.ldm.modules.attention as attention_mod

    calls = []

    def capture_attn(q, k, v, extra):
        if extra.get("block_index", 0) == 0:
            calls.append({"sigma": float(extra["sigmas"].flatten()[0]), "q": q.clone(), "k": k.clone(), "v": v.clone()})
        return attention_mod.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                                 transformer_options=extra)

    base = env["model"].clone()
    base.set_model_attn1_replace(capture_attn, "output", 4, 0)
    pm = _inject(base, env, features, attention)
    block = pm.object_patches["diffusion_model.output_blocks.4.0"]
    feats = []

    def hook(module, inputs, output):
        feats.append((output - module.skip_connection(inputs[0])).detach().clone())

    handle = block.register_forward_hook(hook)
    try:
        out = _sample(pm, env)
    finally:
        handle.remove()
    assert len(feats) == len(calls) == env["steps"]
    for c, f in zip(calls, feats):
        c["h"] = f
    return out, calls


def test_hooks_inject_features_and_qk_only_inside_their_windows(pnp_env):
    env = pnp_env
    _, calls = _capture_run(env, features=0.4, attention=0.6)  # 5 steps: features 0-1, attention 0-2
    sigmas = env["source"].trajectory.sigmas
    assert [c["sigma"] for c in calls] == pytest.approx([float(s) for s in sigmas[:-1]])
    batch = [c["q"].shape[0] for c in calls]
    assert batch == [3, 3, 3, 2, 2]  # cond + uncond (+ the source only inside a window)
    for i in (0, 1):  # both injected: every target row holds the source row's features and q/k
        c = calls[i]
        for row in (0, 1):
            # h is recovered as output - skip(x): equal up to that subtraction's rounding
            assert torch.allclose(c["h"][row], c["h"][2], atol=1e-5, rtol=0)
            assert torch.equal(c["q"][row], c["q"][2]) and torch.equal(c["k"][row], c["k"][2])
            assert not torch.allclose(c["v"][row], c["v"][2])  # v stays the target's
    c = calls[2]  # attention only
    assert torch.equal(c["q"][0], c["q"][2]) and torch.equal(c["k"][1], c["k"][2])
    assert not torch.allclose(c["h"][0], c["h"][2], atol=1e-3)
    for c in calls[3:]:  # outside both windows: the plain batch, nothing injected
        assert not torch.allclose(c["q"][0], c["q"][1], atol=1e-3)


def test_source_branch_is_the_source_latent_with_the_source_prompt(pnp_env):
    """The injected features are those of the source at that sigma (not of some other input)."""
    import comfy.model_management

    env = pnp_env
    _, calls = _capture_run(env, features=0.4, attention=0.6)
    model = env["model"]
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    got = []
    handle = unet.output_blocks[4][0].register_forward_hook(
        lambda m, i, o: got.append((o - m.skip_connection(i[0])).detach().clone()))
    try:
        src = env["source"]
        sigma = src.trajectory.sigmas[0].reshape(1)
        with torch.no_grad():
            model.model.apply_model(src.trajectory.latents[0], sigma, c_crossattn=src.model_kwargs["c_crossattn"])
    finally:
        handle.remove()
    ref = got[0][0]
    assert torch.allclose(calls[0]["h"][2], ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(calls[0]["h"][2], calls[3]["h"][0], atol=1e-2)


# ---- samplers, batches, other patches --------------------------------------------------------

# ---- off-schedule runs are refused, naming both schedules -----------------------------------------

def _batch_sizes(env, pm_factory, run):
    """Batch size of every U-Net call (decoder block 4's first self-attention) during ``run(pm)``."""
    import comfy.ldm.modules.attention as attention_mod

    sizes = []

    def capture_attn(q, k, v, extra):
        if extra.get("block_index", 0) == 0:
            sizes.append((float(extra["sigmas"].flatten()[0]), q.shape[0]))
        return attention_mod.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                                 transformer_options=extra)

    base = env["model"].clone()
    base.set_model_attn1_replace(capture_attn, "output", 4, 0)
    out = run(pm_factory(base))
    return out, sizes


OFF_SCHEDULE = {
    "scheduler karras": dict(scheduler="karras"),
    "6 steps": dict(steps=6),
    "uni_pc drops a sigma": dict(sampler="uni_pc"),
    "dpm_2 drops a sigma": dict(sampler="dpm_2"),
    "denoise 0.5": dict(denoise=0.5),
}


@pytest.mark.parametrize("case", list(OFF_SCHEDULE))
def test_off_schedule_runs_are_refused_naming_both_schedules(pnp_env, case):
    env = pnp_env
    kw = dict(OFF_SCHEDULE[case])
    steps = kw.pop("steps", env["steps"])
    pm = _inject(env["model"], env)
    with pytest.raises(ValueError, match=r"PlugKitPnPInject: the sampler's sigmas \[.*\] \(\d+ steps\) are not on the "
                                         r"schedule 'pnp_source' was inverted on \(ddim_uniform: \[.*\(5 steps\)\).*"
                                         r"Fix: sample with scheduler 'ddim_uniform' and 5 steps.*'sigmas' input"):
        _sample(pm, dict(env, steps=steps), **kw)
    # the plain model runs the same settings without a word (the check belongs to the injection)
    _sample(env["model"], dict(env, steps=steps), **kw)


def test_a_sampler_that_adds_noise_is_refused(pnp_env):
    from tools.fixtures.models import sample

    env = pnp_env
    pm = _inject(env["model"], env)
    with pytest.raises(ValueError, match="PlugKitPnPInject: the sampler adds noise.*add_noise 'disable'"):
        sample(pm, env["inverted"]["samples"], env["target_cond"], env["negative"], steps=env["steps"], cfg=3.0,
               sampler="ddim", scheduler="ddim_uniform", add_noise=True)  # what core KSampler always does


def _sample_custom(model, env, sigmas, sampler="euler", latent=None, cfg=3.0):
    import comfy.sample
    import comfy.samplers

    lat = env["inverted"]["samples"] if latent is None else latent
    return comfy.sample.sample_custom(model, torch.zeros_like(lat), cfg, comfy.samplers.sampler_object(sampler), sigmas,
                                      env["target_cond"], env["negative"], lat, disable_pbar=True, seed=0)


def test_sigmas_input_makes_any_schedule_exact(pnp_env):
    """Invert on the sampler's own SIGMAS: a karras run equals the run inverted with scheduler karras."""
    import comfy.samplers

    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    env = pnp_env
    ms = env["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", env["steps"])
    by_sigmas = PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]},
                                         conditioning=env["source_cond"], steps=99, inversion_steps=5,
                                         scheduler="ddim_uniform", sigmas=sigmas).result
    by_name = PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]},
                                       conditioning=env["source_cond"], steps=env["steps"], inversion_steps=5,
                                       scheduler="karras").result
    assert torch.equal(by_sigmas[0].trajectory.latents, by_name[0].trajectory.latents)
    assert by_sigmas[0].scheduler == "custom SIGMAS" and by_sigmas[0].steps == env["steps"]
    a = _sample_custom(_inject(env["model"], dict(env, source=by_sigmas[0])), env, sigmas, latent=by_sigmas[1]["samples"])
    b = _sample(_inject(env["model"], dict(env, source=by_name[0])), env, latent=by_name[1]["samples"], sampler="euler",
                scheduler="karras")
    assert torch.equal(a, b)
    # uni_pc through SamplerCustom keeps every sigma: accepted, and on the schedule
    out = _sample_custom(_inject(env["model"], dict(env, source=by_sigmas[0])), env, sigmas, sampler="uni_pc",
                         latent=by_sigmas[1]["samples"])
    assert torch.isfinite(out).all()
    # a schedule other than the connected SIGMAS is still refused, and the fix names the SIGMAS
    with pytest.raises(ValueError, match="custom SIGMAS.*SIGMAS that were connected"):
        _sample(_inject(env["model"], dict(env, source=by_sigmas[0])), env, latent=by_sigmas[1]["samples"])
    with pytest.raises(ValueError, match="input 'sigmas' must be a strictly decreasing"):
        PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]},
                                 conditioning=env["source_cond"], sigmas=torch.tensor([1.0, 2.0]))


# ---- split runs count the windows on the trajectory ------------------------------------------------

def test_split_runs_inject_at_the_same_steps_as_a_single_run(pnp_env):
    import comfy.samplers

    env = pnp_env
    ms = env["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", env["steps"])

    def factory(base):
        return _inject(base, env, 0.8, 0.6)  # 5 steps: features 0-3, attention 0-2

    single, single_sizes = _batch_sizes(env, factory, lambda pm: _sample(pm, env))
    assert [b for _, b in single_sizes] == [3, 3, 3, 3, 2]

    def advanced(pm):  # KSamplerAdvanced 0-2 (leftover noise), then 2-5
        first = _sample(pm, env, start_step=0, last_step=2, force_full_denoise=False)
        return _sample(pm, env, latent=first, start_step=2, last_step=10000)

    def split_sigmas(pm):  # SplitSigmas at step 3 into two SamplerCustom runs
        first = _sample_custom(pm, env, sigmas[:4])
        return _sample_custom(pm, env, sigmas[3:], latent=first)

    for run in (advanced, split_sigmas):
        out, sizes = _batch_sizes(env, factory, run)
        assert sizes == single_sizes, run.__name__  # same sigmas, same injected steps
        assert _rel(out, single) <= 1e-5, (run.__name__, _rel(out, single))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_a_second_evaluation_belongs_to_the_step_it_started(pnp_env, sampler):
    """Heun evaluates step i at sigma_i and again at sigma_(i+1); dpmpp_2s_ancestral (eta 1) at the
    midpoint of sigma_i and sigma_(i+1)^2/sigma_i, which is sigma_(i+1) too: both belong to step i
    (by sigma alone the second would count as step i+1 and end the window one evaluation early)."""
    env = pnp_env
    _, sizes = _batch_sizes(env, lambda base: _inject(base, env, 0.4, 0.4), lambda pm: _sample(pm, env, sampler=sampler))
    sig = [float(s) for s in env["source"].trajectory.sigmas]
    # steps 0..4; steps 0-1 injected: evaluations s0, s1 | s1, s2 | s2, s3 | s3, s4 | s4 (last: Euler to 0)
    assert [s for s, _ in sizes] == pytest.approx([sig[0], sig[1], sig[1], sig[2], sig[2], sig[3], sig[3], sig[4], sig[4]],
                                                  rel=1e-5)
    assert [b for _, b in sizes] == [3, 3, 3, 3, 2, 2, 2, 2, 2]


def test_intermediate_sigmas_are_interpolated_with_a_warning(pnp_env, caplog):
    env = pnp_env
    import comfy.samplers

    ms = env["model"].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", env["steps"])
    with caplog.at_level("WARNING", logger="plugkit.nodes.pnp.hooks"):
        out = _sample_custom(_inject(env["model"], env), env, sigmas, sampler="dpm_2")  # midpoint evaluations
    assert torch.isfinite(out).all()
    assert any("between the inversion's sigmas" in r.getMessage() for r in caplog.records)


def _per_row_source(source, b):
    """The same source repeated to ``b`` items: PnP then runs one source row per batch row (the
    pre-issue-15 behaviour for a shared source: 3B rows per windowed call)."""
    traj = source.trajectory
    kw = {k: (v.repeat((b,) + (1,) * (v.dim() - 1)) if torch.is_tensor(v) else v) for k, v in source.model_kwargs.items()}
    return dataclasses.replace(source, trajectory=type(traj)(traj.sigmas, traj.latents.repeat(1, b, 1, 1, 1)),
                               model_kwargs=kw)


@pytest.mark.parametrize("b", [2, 4])
def test_a_batch_on_one_source_runs_one_source_row(pnp_env, b):
    """Batch B on one shared source: 2B+1 rows per windowed U-Net call (not 3B), and the same result
    as B per-row source copies within 1e-5. Fails with the old ``rows = arange(chunk)`` (3B rows)."""
    from plugkit.nodes.pnp.nodes import PlugKitPnPInject

    env = pnp_env
    lat = env["inverted"]["samples"].repeat(b, 1, 1, 1)
    out, sizes = _batch_sizes(env, lambda base: _inject(base, env), lambda pm: _sample(pm, env, latent=lat))
    assert [n for _, n in sizes] == [2 * b + 1] * 4 + [2 * b]  # windows 0.8/0.5 of 5 steps: 4 with the source
    ref_src = _per_row_source(env["source"], b)
    ref, ref_sizes = _batch_sizes(env, lambda base: PlugKitPnPInject.execute(model=base, pnp_source=ref_src).result[0],
                                  lambda pm: _sample(pm, env, latent=lat))
    assert [n for _, n in ref_sizes] == [3 * b] * 4 + [2 * b]
    # Tolerances relative to the latent's scale: the source's residual branch runs on its own rows
    # (1 here, B in the reference) and conv kernels of another batch size round differently. Measured:
    # one step 4e-6 of the scale, the 5-step CFG run 1.6e-5 (computing every row's residual, as
    # before issue 15, the run agreed within 1e-5 absolute).
    scale = float(ref.abs().max())
    assert out.shape[0] == b and (out - ref).abs().max() <= 5e-5 * scale
    assert (out[0] - out[-1]).abs().max() <= 1e-5 * scale
    one = dict(start_step=0, last_step=1, force_full_denoise=False)
    first = _sample(_inject(env["model"], env), env, latent=lat, **one)
    first_ref = _sample(PlugKitPnPInject.execute(model=env["model"], pnp_source=ref_src).result[0], env, latent=lat, **one)
    assert (first - first_ref).abs().max() <= 1e-5 * float(first_ref.abs().max())
    single = _sample(_inject(env["model"], env), env)
    assert (out[:1] - single).abs().max() <= 5e-5 * scale


def test_cooperates_with_core_freeu(pnp_env, comfy_nodes):
    env = pnp_env
    pm = _inject(env["model"], env)
    both = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(pm, 1.3, 1.4, 0.9, 0.2)[0]
    a = _sample(pm, env)
    b = _sample(both, env)
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-4


# ---- isolation -------------------------------------------------------------------------------

def test_nothing_persists_between_runs_or_graphs(pnp_env):
    from plugkit.nodes.pnp import hooks
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    env = pnp_env
    model = env["model"]
    plain_before = _sample(model, env)
    other_src, _ = PlugKitPnPInvert.execute(model=model, samples={"samples": env["latent"].flip(-1)},
                                            conditioning=env["source_cond"], steps=5, inversion_steps=5).result
    a = _inject(model, env)
    b = _inject(model, dict(env, source=other_src))
    first = _sample(a, env)
    other = _sample(b, env)
    again = _sample(a, env)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    assert torch.equal(_sample(model, env), plain_before)
    # the incoming model was never touched
    assert not model.object_patches and not hooks.has_pnp(model)
    assert hooks.RUN_KEY not in a.model_options.get("transformer_options", {})
    assert hooks._CALL.get() is None


def test_interrupted_run_leaves_nothing_behind(pnp_env):
    import comfy.sample

    from plugkit.nodes.pnp import hooks

    env = pnp_env
    pm = _inject(env["model"], env)
    reference = _sample(pm, env)

    class Stop(Exception):
        pass

    def callback(step, x0, x, total):
        if step == 1:
            raise Stop

    lat = env["inverted"]["samples"]
    with pytest.raises(Stop):
        comfy.sample.sample(pm, torch.zeros_like(lat), env["steps"], 3.0, "ddim", "ddim_uniform", env["target_cond"],
                            env["negative"], lat, disable_noise=True, callback=callback, disable_pbar=True, seed=0)
    assert hooks._CALL.get() is None
    assert hooks.RUN_KEY not in pm.model_options.get("transformer_options", {})
    assert torch.equal(_sample(pm, env), reference)


# ---- errors ----------------------------------------------------------------------------------

def test_error_for_a_non_unet_model(pnp_env):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInject, PlugKitPnPInvert

    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="PlugKitPnPInject.*U-Net"):
        PlugKitPnPInject.execute(model=fake, pnp_source=pnp_env["source"])
    with pytest.raises(ValueError, match="PlugKitPnPInvert.*U-Net"):
        PlugKitPnPInvert.execute(model=fake, samples={"samples": pnp_env["latent"]}, conditioning=pnp_env["source_cond"])


def test_error_for_a_source_of_another_latent_size_or_batch(pnp_env):
    env = pnp_env
    pm = _inject(env["model"], env)
    with pytest.raises(ValueError, match=r"PlugKitPnPInject.*24x16 latent.*16x16 latent"):
        _sample(pm, env, latent=torch.zeros(1, 4, 16, 24))
    two = dataclasses.replace(env["source"], trajectory=type(env["source"].trajectory)(
        env["source"].trajectory.sigmas, env["source"].trajectory.latents.repeat(1, 2, 1, 1, 1)))
    pm2 = _inject(env["model"], dict(env, source=two))
    with pytest.raises(ValueError, match="batch is 3 but 'pnp_source' holds 2"):
        _sample(pm2, env, latent=env["inverted"]["samples"].repeat(3, 1, 1, 1))


def test_error_for_a_source_of_another_model_family(pnp_env):
    env = pnp_env
    sdxl_source = dataclasses.replace(env["source"], family="SDXL")
    with pytest.raises(ValueError, match="SDXL model but 'model' is a SD15 model"):
        _inject(env["model"], dict(env, source=sdxl_source))


def test_error_cases_of_inject_inputs(pnp_env):
    env = pnp_env
    pm = _inject(env["model"], env)
    with pytest.raises(ValueError, match="already comes from a Plug-and-Play Inject"):
        _inject(pm, env)
    with pytest.raises(ValueError, match="feature_blocks"):
        _inject(env["model"], env, feature_blocks="4x")
    with pytest.raises(ValueError, match="PlugKitPnPInject: input 'attention_blocks' names decoder block 12, which does not exist; use 0-11"):
        _inject(env["model"], env, attention_blocks="4-12")
    with pytest.raises(ValueError, match="no self-attention"):
        _inject(env["model"], env, attention_blocks="1")
    with pytest.raises(ValueError, match="feature_injection"):
        _inject(env["model"], env, features=1.5)
    with pytest.raises(TypeError, match="pnp_source"):
        from plugkit.nodes.pnp.nodes import PlugKitPnPInject
        PlugKitPnPInject.execute(model=env["model"], pnp_source="nope")


def test_family_defaults_and_block_parsing():
    from plugkit.nodes.pnp import blocks

    sd15 = types.SimpleNamespace(output_blocks=[None] * 12)
    sdxl = types.SimpleNamespace(output_blocks=[None] * 9)
    assert blocks.family_defaults(sd15, "N")["features"] == (4,)
    assert blocks.family_defaults(sd15, "N")["attention"] == tuple(range(4, 12))
    assert blocks.family_defaults(sdxl, "N") == {"name": "SDXL", "features": (1,), "attention": (1, 2, 3, 4, 5)}
    assert blocks.parse_blocks("output.4, 6-7", 12, "N", "x") == (4, 6, 7)
    assert blocks.parse_blocks("none", 12, "N", "x") == ()
    with pytest.raises(ValueError):
        blocks.family_defaults(types.SimpleNamespace(output_blocks=[None] * 5), "N")


def test_custom_blocks_inject_where_asked(pnp_env):
    env = pnp_env
    pm = _inject(env["model"], env, feature_blocks="5", attention_blocks="none")
    assert list(pm.object_patches) == ["diffusion_model.output_blocks.5.0", "memory_required"]
    assert "attn1" not in pm.model_options.get("transformer_options", {}).get("patches_replace", {})
    assert (_sample(pm, env) - _sample(env["model"], env)).abs().max() > 1e-3


# ---- feature map -----------------------------------------------------------------------------

def test_feature_map_images(pnp_env):
    from plugkit.nodes.pnp.nodes import PlugKitFeatureMap

    env = pnp_env
    out = PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=-1, step=0, kind="features")
    img = out.result[0]
    assert img.shape == (1, 128, 128, 3)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and float(img.std()) > 0.05
    assert out.ui is not None and out.ui.as_dict()["images"]
    same = PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=4, step=0, kind="features").result[0]
    assert torch.equal(img, same)
    other = PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=8, step=0, kind="features").result[0]
    assert not torch.allclose(img, other, atol=1e-2)
    attn = PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=4, step=2,
                                     kind="self-attention").result[0]
    assert attn.shape == (1, 128, 128, 3) and float(attn.std()) > 0.05
    with pytest.raises(ValueError, match="'step' is 9"):
        PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=4, step=9)
    with pytest.raises(ValueError, match="no self-attention"):
        PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=0, kind="self-attention")


# ---- SDXL and long prompts -------------------------------------------------------------------

def sdxl_conditioning(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def test_sdxl_uses_its_block_mapping_and_adm_input(tiny_sdxl, pnp_env):
    from tools.fixtures.models import sample

    from plugkit.nodes.pnp.nodes import PlugKitPnPInject, PlugKitPnPInvert

    lat = pnp_env["latent"]
    src, inv = PlugKitPnPInvert.execute(model=tiny_sdxl, samples={"samples": lat}, conditioning=sdxl_conditioning(1),
                                        steps=4, inversion_steps=4).result
    assert src.family == "SDXL" and sorted(src.model_kwargs) == ["c_crossattn", "y"]
    pm = PlugKitPnPInject.execute(model=tiny_sdxl, pnp_source=src).result[0]
    assert list(pm.object_patches) == ["diffusion_model.output_blocks.1.0", "memory_required"]
    keys = sorted(pm.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert keys == [("output", 1, 0), ("output", 1, 1), ("output", 2, 0), ("output", 2, 1), ("output", 3, 0),
                    ("output", 4, 0), ("output", 5, 0)]

    def run(m):
        return sample(m, inv["samples"], sdxl_conditioning(3), sdxl_conditioning(2), steps=4, sampler="ddim",
                      scheduler="ddim_uniform", add_noise=False)

    plain = run(tiny_sdxl)
    assert torch.equal(run(PlugKitPnPInject.execute(model=tiny_sdxl, pnp_source=src, feature_injection=0.1,
                                                    attention_injection=0.1).result[0]), plain)
    assert (run(pm) - plain).abs().max() > 1e-3
    # real family detection: an SD1.5 source on an SDXL model (and back) is refused, naming both
    with pytest.raises(ValueError, match="SD15 model but 'model' is a SDXL model"):
        PlugKitPnPInject.execute(model=tiny_sdxl, pnp_source=pnp_env["source"])
    with pytest.raises(ValueError, match="SDXL model but 'model' is a SD15 model"):
        PlugKitPnPInject.execute(model=pnp_env["model"], pnp_source=src)


def test_long_target_prompt_and_control_padding(pnp_env):
    from tools.fixtures.models import random_conditioning

    from plugkit.nodes.pnp import hooks

    env = pnp_env
    long_prompt = random_conditioning(tokens=154, seed=5)
    out = _sample(_inject(env["model"], env), env, positive=long_prompt)
    plain = _sample(env["model"], env, positive=long_prompt)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    ctrl = {"output": [torch.ones(2, 3, 4, 4), None], "middle": [torch.ones(2, 3, 2, 2)], "other": 7}
    padded = hooks._pad_control(ctrl, 1)
    assert padded["output"][0].shape == (3, 3, 4, 4) and float(padded["output"][0][2].abs().sum()) == 0.0
    assert padded["output"][1] is None and padded["other"] == 7 and ctrl["output"][0].shape[0] == 2


def test_invert_and_feature_map_ignore_injection_on_their_model(pnp_env):
    """An injected model given to Invert inverts like the plain one (its schedule check is for sampling)."""
    from plugkit.nodes.pnp.nodes import PlugKitFeatureMap, PlugKitPnPInvert

    env = pnp_env
    pm = _inject(env["model"], env)
    src, inv = PlugKitPnPInvert.execute(model=pm, samples={"samples": env["latent"]}, conditioning=env["source_cond"],
                                        steps=5, inversion_steps=5).result
    assert torch.equal(src.trajectory.latents, env["source"].trajectory.latents)
    a = PlugKitFeatureMap.execute(model=pm, pnp_source=env["source"], block=4, step=0).result[0]
    b = PlugKitFeatureMap.execute(model=env["model"], pnp_source=env["source"], block=4, step=0).result[0]
    assert torch.equal(a, b)


# ---- other packs' patches ----------------------------------------------------------------------

def test_a_resblock_embed_patch_that_bypasses_the_injection_is_reported(pnp_env):
    """ComfyUI calls a forward_timestep_embed_patch instead of the layer's forward (and since 0.20 it
    sees ResBlocks too): one that computes a ResBlock itself would silently switch PnP's features off."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    env = pnp_env
    plain_blocks = []

    def own_resblock(layer, x, emb, *args):  # another pack's re-implementation of the block
        plain_blocks.append(type(layer).__name__)
        inner = getattr(layer, "_plain", layer)
        return inner._forward(x, emb)

    def calls_the_layer(layer, x, emb, *args):  # a well-behaved wrapper
        return layer(x, emb)

    expected = _sample(_inject(env["model"], env), env)
    good = env["model"].clone()
    good.set_model_patch((ResBlock, calls_the_layer), "forward_timestep_embed_patch")
    torch.testing.assert_close(_sample(_inject(good, env), env), expected, rtol=0, atol=1e-6)

    bad = env["model"].clone()
    bad.set_model_patch((ResBlock, own_resblock), "forward_timestep_embed_patch")
    injected = _inject(bad, env)
    try:
        out = _sample(injected, env)
    except RuntimeError as exc:
        assert "forward_timestep_embed_patch handles ResBlocks itself (ResBlock -> " in str(exc)
        assert plain_blocks and "PlugKitPnPInject" in str(exc)
        return
    # ComfyUI before 0.20 hands only unknown layer types to this patch: nothing can bypass PnP there.
    assert not plain_blocks, "the patch replaced PnP's block and nothing said so"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    pytest.skip("this ComfyUI never hands ResBlocks to forward_timestep_embed_patch (before 0.20)")


# ---- source cache (issue 15) -----------------------------------------------------------------

def _counting_base(env, sizes):
    """A clone whose decoder block 4 first self-attention records (sigma, rows) of every U-Net call."""
    import comfy.ldm.modules.attention as attention_mod

    def capture_attn(q, k, v, extra):
        if extra.get("block_index", 0) == 0:
            sizes.append(q.shape[0])
        return attention_mod.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                                 transformer_options=extra)

    base = env["model"].clone()
    base.set_model_attn1_replace(capture_attn, "output", 4, 0)
    return base


@pytest.mark.parametrize("mode", ["cache", "cache on CPU"])
def test_source_cache_equals_in_batch_and_skips_the_source_branch(pnp_env, mode, caplog):
    """First run: in-batch, filling the cache; later runs: no source rows, same result (1e-5).
    Proved to fail once: swapping the cached q and k in AttentionInjection's cache path broke the
    equality (max diff > 1e-2)."""
    import logging

    from plugkit.nodes.pnp.nodes import PlugKitPnPInject

    env = pnp_env
    src = dataclasses.replace(env["source"])  # its own, empty cache
    sizes = []
    base = _counting_base(env, sizes)
    ref = _sample(PlugKitPnPInject.execute(model=base, pnp_source=src).result[0], env)
    assert sizes == [3, 3, 3, 3, 2] and not src.cache.steps  # in-batch keeps nothing
    pm = PlugKitPnPInject.execute(model=base, pnp_source=src, source_mode=mode).result[0]
    sizes.clear()
    with caplog.at_level(logging.INFO, logger="plugkit.nodes.pnp.hooks"):
        first = _sample(pm, env)
    assert sizes == [3, 3, 3, 3, 2]  # fills the cache in-batch
    assert (first - ref).abs().max() <= 1e-5
    sig = [float(s) for s in src.trajectory.sigmas[:4]]
    assert sorted(src.cache.steps, reverse=True) == pytest.approx(sig)
    attn_keys = {(kind, ("output", i), 0) for i in range(4, 12) for kind in ("q", "k")}
    for i, s in enumerate(sorted(src.cache.steps, reverse=True)):  # features 4 steps, q/k the first 2
        keys = set(src.cache.steps[s])
        assert keys == ({("features", 4)} | (attn_keys if i < 2 else set())), i
    assert src.cache.on_cpu == (mode == "cache on CPU")
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape[0] == 1
               for e in src.cache.steps.values() for t in e.values())
    size = src.cache.nbytes()
    feat = src.cache.steps[sig[0]][("features", 4)]
    q9 = src.cache.steps[sig[0]][("q", ("output", 9), 0)]
    assert size >= 4 * feat.numel() * 4 + 2 * 2 * 3 * q9.numel() * 4
    assert any("source cache: 4 sigmas" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    sizes.clear()
    second = _sample(pm, env)
    assert sizes == [2, 2, 2, 2, 2]  # the source branch never runs
    assert (second - ref).abs().max() <= 1e-5 and src.cache.nbytes() == size
    # another Inject node on the same model and source shares the cache
    sizes.clear()
    _sample(PlugKitPnPInject.execute(model=base, pnp_source=src, source_mode=mode).result[0], env)
    assert sizes == [2, 2, 2, 2, 2]
    # a batch of 2 reads the same one-row cache: 4 rows per call, equal to in-batch at batch 2
    lat = env["inverted"]["samples"].repeat(2, 1, 1, 1)
    sizes.clear()
    two = _sample(pm, env, latent=lat)
    assert sizes == [4] * 5
    ref2 = _sample(PlugKitPnPInject.execute(model=base, pnp_source=src).result[0], env, latent=lat)
    assert (two - ref2).abs().max() <= 5e-5 * float(ref2.abs().max())


def test_source_cache_is_invalidated_by_model_prompt_and_schedule(pnp_env, comfy_nodes):
    from tools.fixtures.models import random_conditioning

    from plugkit.nodes.pnp.nodes import PlugKitPnPInject, PlugKitPnPInvert

    env = pnp_env
    src = dataclasses.replace(env["source"])
    sizes = []
    base = _counting_base(env, sizes)

    def inject(m, s, mode="cache"):
        return PlugKitPnPInject.execute(model=m, pnp_source=s, source_mode=mode).result[0]

    pm = inject(base, src)
    _sample(pm, env)
    sizes.clear()
    _sample(pm, env)
    assert sizes == [2] * 5
    # another patch on the model (FreeU changes the decoder): recomputed, equal to in-batch with it
    freeu = comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(pm, 1.3, 1.4, 0.9, 0.2)[0]
    sizes.clear()
    a = _sample(freeu, env)
    assert sizes == [3, 3, 3, 3, 2]
    b = _sample(comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(inject(base, src, "in-batch"), 1.3, 1.4, 0.9, 0.2)[0], env)
    assert (a - b).abs().max() <= 1e-5
    # another source prompt in the same source object: recomputed
    other = dict(src.model_kwargs, c_crossattn=random_conditioning(seed=7)[0][0])
    src.model_kwargs = other
    sizes.clear()
    a = _sample(pm, env)
    assert sizes == [3, 3, 3, 3, 2]
    ref_src = dataclasses.replace(env["source"], model_kwargs=other)
    assert (a - _sample(inject(base, ref_src, "in-batch"), env)).abs().max() <= 1e-5
    # another schedule (a source inverted on 'normal'): recomputed
    other_src, other_inv = PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]},
                                                    conditioning=env["source_cond"], steps=5, inversion_steps=5,
                                                    scheduler="normal").result
    src.trajectory = other_src.trajectory
    src.scheduler = "normal"
    src.model_kwargs = env["source"].model_kwargs
    sizes.clear()
    a = _sample(pm, env, latent=other_inv["samples"], scheduler="normal")
    assert sizes == [3, 3, 3, 3, 2]
    ref = _sample(inject(base, other_src, "in-batch"), env, latent=other_inv["samples"], scheduler="normal")
    assert (a - ref).abs().max() <= 1e-5
    assert sorted(src.cache.steps, reverse=True) == pytest.approx([float(s) for s in other_src.trajectory.sigmas[:4]])


# ---- memory the sampler plans with (issue 15) ------------------------------------------------

@pytest.mark.parametrize("b", [1, 2])
def test_comfy_memory_estimates_count_the_source_rows(pnp_env, monkeypatch, b):
    """Both estimates ComfyUI uses grow by exactly the source rows: the model load's (prepare_sampling
    -> load_models_gpu) and the cond/uncond batching's (``model.memory_required`` in _calc_cond_batch).
    Fails without the object patch / the PREPARE_SAMPLING wrapper (then PnP's numbers equal plain's)."""
    import comfy.model_management

    env = pnp_env
    model = env["model"]
    base_cls = type(model.model)
    lat = env["inverted"]["samples"].repeat(b, 1, 1, 1)
    shape = list(lat.shape)

    def plain_estimate(rows):
        return base_cls.memory_required(model.model, [rows] + shape[1:], cond_shapes={})

    loads, batching = [], []
    real_load = comfy.model_management.load_models_gpu

    def spy_load(models, *args, **kwargs):  # the real loader, its arguments recorded
        loads.append((kwargs.get("memory_required"), kwargs.get("minimum_memory_required")))
        return real_load(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy_load)

    def probe(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        # what _calc_cond_batch asks for a batch of the sampler's 2b rows, inside the run
        batching.append(transformer_options["plugkit_probe_model"].memory_required([2 * b] + shape[1:], cond_shapes={}))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    import comfy.patcher_extension

    results = {}
    comfy.model_management.unload_all_models()  # no clone's object patches on the base model
    for name, m in (("plain", model.clone()), ("pnp", _inject(model, env))):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_probe", probe)
        m.model_options.setdefault("transformer_options", {})["plugkit_probe_model"] = m.model
        loads.clear()
        batching.clear()
        _sample(m, env, latent=lat)
        results[name] = (loads[0], batching[0])
    (plain_max, plain_min), plain_batch = results["plain"]
    (pnp_max, pnp_min), pnp_batch = results["pnp"]
    assert plain_batch == pytest.approx(plain_estimate(2 * b)) and plain_max == pytest.approx(plain_estimate(2 * b))
    assert pnp_batch == pytest.approx(plain_estimate(2 * b + 1))  # exactly one source row more
    assert pnp_min == pytest.approx(plain_estimate(b + 1)) and plain_min == pytest.approx(plain_estimate(b))
    assert pnp_max >= plain_estimate(2 * b + 1)
    # a later run, the PnP model still loaded: its patched estimate counts the row once
    loads.clear()
    pm = _inject(model, env)
    _sample(pm, env, latent=lat)
    _sample(pm, env, latent=lat)
    assert loads[-1][0] == pytest.approx(plain_estimate(2 * b + 1)) and loads[-1][1] == pytest.approx(plain_estimate(b + 1))


# ---- faster faithful inversion (fixed-point refinement) -------------------------------------------

def test_fixed_point_inversion_reaches_the_official_999_step_reconstruction_with_100_evaluations(pnp_env):
    """Issue 15's stretch: 50 sampling steps, one fixed-point iteration per inversion step (100 U-Net
    evaluations) reconstructs at least as well as the official 999 steps (within 10%), and better than
    100 plain steps. Measured here (tiny random U-Net): 999 steps 9.7e-2, 100 plain 1.3e-1, fixed point
    4.3e-2. With the refinement turned into a no-op the fixed-point run is the plain 50-step one
    (1.7e-1) and this fails."""
    from tools.fixtures.pnp_reconstruction import official_reconstruction_error

    env = pnp_env
    args = (env["model"], env["latent"], env["source_cond"], 50)
    official, _ = official_reconstruction_error(*args, inversion_resolution="official 999")
    plain_100, _ = official_reconstruction_error(*args, inversion_steps=100)
    fixed, src = official_reconstruction_error(*args, inversion_steps=50, fixed_point_iterations=1)
    assert src.inversion_steps == 50 and src.extra["fixed_point_iterations"] == 1
    assert fixed <= 1.1 * official, (fixed, official)
    assert fixed < plain_100, (fixed, plain_100)


def test_fixed_point_iterations_out_of_range_is_refused(pnp_env):
    from plugkit.nodes.pnp.nodes import PlugKitPnPInvert

    env = pnp_env
    with pytest.raises(ValueError, match="PlugKitPnPInvert: input 'fixed_point_iterations' is 11; use 0-10"):
        PlugKitPnPInvert.execute(model=env["model"], samples={"samples": env["latent"]}, conditioning=env["source_cond"],
                                 steps=5, fixed_point_iterations=11)


def test_near_the_memory_limit_no_call_holds_more_rows_than_plain_sampling(pnp_env, monkeypatch):
    """In-batch's third row costs memory only where it fits: with free memory between ComfyUI's need
    for plain sampling's cond+uncond call (1.5x the estimate of 2 rows) and PnP's (3 rows), ComfyUI runs
    cond and uncond apart, each with the source row: 2 rows per windowed call, plain's peak, and the
    same result within float rounding. Fails without the memory_required patch (then one 3-row call)."""
    import comfy.model_management

    env = pnp_env
    model = env["model"]
    shape = list(env["inverted"]["samples"].shape)
    estimate = type(model.model).memory_required
    need_plain = 1.5 * estimate(model.model, [2] + shape[1:], cond_shapes={})
    need_pnp = 1.5 * estimate(model.model, [3] + shape[1:], cond_shapes={})
    assert need_plain < need_pnp
    sizes = []
    base = _counting_base(env, sizes)
    unsplit = _sample(_inject(base, env), env)
    assert sizes == [3, 3, 3, 3, 2]
    sizes.clear()
    real_free = comfy.model_management.get_free_memory

    def free_memory(dev=None, torch_free_too=False):  # the batching's question; attention's as it is
        if torch_free_too:
            return real_free(dev, True)
        return (need_plain + need_pnp) / 2

    monkeypatch.setattr(comfy.model_management, "get_free_memory", free_memory)
    split = _sample(_inject(base, env), env)
    assert sizes == [2, 2] * 4 + [1, 1], sizes  # cond and uncond apart; each windowed call adds the source row
    scale = float(unsplit.abs().max())
    assert (split - unsplit).abs().max() <= 1e-5 * scale
