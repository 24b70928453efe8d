"""Host tests: apply_to picks batch rows by the role ComfyUI gives their conditioning, under every guider.

``cond_or_uncond`` is each chunk's index in the list handed to ``calc_cond_batch``, which means
cond/uncond only for the standard CFG guider. Each test runs a real guider or node from ComfyUI's
``comfy_extras`` on the tiny SD1.x model and observes, with two plain output-block patches placed
right before and right after PlugKitFreeU, which chunks FreeU actually changed, named by the
guider's own cond uuids. Before the fix (rows chosen by index), DualCFGGuider's ``cond`` hit the
negative prompt, PerpNegGuider's empty prompt was never patched and SAG's extra pass (the negative
prompt on the blurred latent) counted as cond.
"""
from __future__ import annotations

import logging

import pytest
import torch

STEPS = 1


@pytest.fixture(scope="module")
def env(comfy, comfy_nodes):
    from tools.fixtures.models import build_model, random_conditioning

    prompts = {name: random_conditioning(seed=seed) for seed, name in enumerate(("pos", "mid", "neg", "empty"), 1)}
    return build_model(seed=0), torch.zeros(1, 4, 16, 16), prompts


def spied_freeu(model, apply_to):
    """model -> [before, PlugKitFreeU, after]; returns (patched model, record).

    ``record``: a list of (uuids of one model call, uuids whose rows FreeU changed in it). The spies
    are closures (ModelPatcher.clone deep-copies model_options; functions are kept, not copied).
    """
    from plugkit.nodes.freeu.nodes import PlugKitFreeU

    saved, calls = {}, {}

    def before(h, hsp, to):
        saved["h"], saved["hsp"] = h.clone(), None if hsp is None else hsp.clone()
        return h, hsp

    def after(h, hsp, to):
        uuids = tuple(to["uuids"])
        n = h.shape[0] // len(uuids)
        key = (id(to.get("sigmas")), uuids)
        changed = calls.setdefault(key, set())
        for i, u in enumerate(uuids):
            sl = slice(i * n, (i + 1) * n)
            if not torch.equal(h[sl], saved["h"][sl]) or not torch.equal(hsp[sl], saved["hsp"][sl]):
                changed.add(u)
        return h, hsp

    m = model.clone()
    m.set_model_output_block_patch(before)
    m = PlugKitFreeU.execute(model=m, b1=1.3, b2=1.4, s1=0.9, s2=0.2, apply_to=apply_to).result[0]
    m.set_model_output_block_patch(after)
    return m, calls


def run_guider(guider, latent):
    import comfy.sample
    import comfy.samplers

    noise = comfy.sample.prepare_noise(latent, 0, None)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", STEPS)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)


def names(guider):
    """uuid -> the guider's key for it (positive, negative, middle, empty_negative_prompt)."""
    return {c["uuid"]: k for k, conds in guider.original_conds.items() for c in conds}


def passes(calls, guider):
    """[(keys of one model call, keys FreeU changed in it)], foreign uuids shown as 'foreign'."""
    by_uuid = names(guider)
    name = lambda u: by_uuid.get(u, "foreign")
    out = {(tuple(sorted(map(name, uuids))), tuple(sorted(map(name, changed)))) for (_, uuids), changed in calls.items()}
    return sorted(out)


def cfg_guider(model, p):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(p["pos"], p["neg"])
    g.set_cfg(2.0)
    return g


@pytest.mark.parametrize("apply_to,changed", [("cond", ("positive",)), ("uncond", ("negative",)),
                                              ("both", ("negative", "positive"))])
def test_cfg_guider(env, apply_to, changed):
    model, latent, p = env
    m, calls = spied_freeu(model, apply_to)
    g = cfg_guider(m, p)
    run_guider(g, latent)
    assert passes(calls, g) == [(("negative", "positive"), changed)]


@pytest.mark.parametrize("style", ["regular", "nested"])
@pytest.mark.parametrize("apply_to,changed", [("cond", ("positive",)), ("uncond", ("middle", "negative")),
                                              ("both", ("middle", "negative", "positive"))])
def test_dual_cfg_guider(env, style, apply_to, changed):
    """DualCFGGuider calls calc_cond_batch([negative, cond2, cond1]): index 0 is the negative prompt.
    cond = cond1 (key 'positive'); cond2 (key 'middle') is encoded by ComfyUI as prompt_type
    'negative' (it is the uncond of cond1's guidance), so it is uncond with the negative prompt."""
    from comfy_extras.nodes_custom_sampler import DualCFGGuider

    model, latent, p = env
    m, calls = spied_freeu(model, apply_to)
    g = DualCFGGuider.execute(m, p["pos"], p["mid"], p["neg"], 2.0, 3.0, style).result[0]
    run_guider(g, latent)
    assert passes(calls, g) == [(("middle", "negative", "positive"), changed)]


@pytest.mark.parametrize("apply_to,changed", [("cond", ("positive",)),
                                              ("uncond", ("empty_negative_prompt", "negative")),
                                              ("both", ("empty_negative_prompt", "negative", "positive"))])
def test_perp_neg_guider(env, apply_to, changed):
    """PerpNegGuider: [positive, negative, empty]; the empty prompt is marked 'negative' by ComfyUI."""
    from comfy_extras.nodes_perpneg import PerpNegGuider

    model, latent, p = env
    m, calls = spied_freeu(model, apply_to)
    g = PerpNegGuider.execute(m, p["pos"], p["neg"], p["empty"], 2.0, 1.0).result[0]
    run_guider(g, latent)
    assert passes(calls, g) == [(("empty_negative_prompt", "negative", "positive"), changed)]


@pytest.mark.parametrize("apply_to,main,extra", [("cond", ("positive",), ()), ("uncond", ("negative",), ("negative",)),
                                                 ("both", ("negative", "positive"), ("negative",))])
def test_self_attention_guidance_extra_pass(env, apply_to, main, extra):
    """SAG runs the negative prompt again on a blurred latent (calc_cond_batch([uncond]), index 0):
    that pass is uncond."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model, latent, p = env
    m, calls = spied_freeu(model, apply_to)
    m = SelfAttentionGuidance.execute(m, 0.5, 2.0).result[0]
    g = cfg_guider(m, p)
    run_guider(g, latent)
    assert passes(calls, g) == [(("negative",), extra), (("negative", "positive"), main)]


@pytest.mark.parametrize("apply_to", ["cond", "uncond", "both"])
def test_deprecated_perp_neg_node_empty_pass_is_unknown(env, apply_to, caplog):
    """The deprecated PerpNeg node encodes its empty prompt itself (not one of the guider's conds):
    its role is unknown, so only 'both' patches it, and a warning says so."""
    from comfy_extras.nodes_perpneg import PerpNeg

    model, latent, p = env
    m, calls = spied_freeu(model, apply_to)
    m = PerpNeg.execute(m, p["empty"], 1.0).result[0]
    g = cfg_guider(m, p)
    with caplog.at_level(logging.WARNING):
        run_guider(g, latent)
    main = {"cond": ("positive",), "uncond": ("negative",), "both": ("negative", "positive")}[apply_to]
    extra = ("foreign",) if apply_to == "both" else ()
    assert passes(calls, g) == [(("foreign",), extra), (("negative", "positive"), main)]
    warned = [r for r in caplog.records if "not the guider's own" in r.getMessage()]
    assert len(warned) == (0 if apply_to == "both" else 1)  # once per run, not once per step


def test_roles_are_run_scoped(env):
    """Nothing of a run is left on the model: the run entry lives in the run's own model_options."""
    from plugkit.nodes.freeu.hooks import ROLES_KEY, RUN_KEY

    model, latent, p = env
    m, _ = spied_freeu(model, "cond")
    g = cfg_guider(m, p)
    run_guider(g, latent)
    for options in (m.model_options["transformer_options"], g.model_options["transformer_options"]):
        assert RUN_KEY not in options and ROLES_KEY not in options
