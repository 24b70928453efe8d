"""Diff-Plugin math: TPB / SCB / selector against references written here from the published
architecture (yuhaoliu7456/Diff-Plugin modules/*.py, diffusers 0.17 blocks). No ComfyUI."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plugkit.nodes.diff_plugin.plugin_selector import (
    RULE_ABOVE_NULL, RULE_OFFICIAL, PromptTuner, select_plugins)
from plugkit.nodes.diff_plugin.task_plugin import (
    SpatialComplementBranch, TaskPlugin, TaskPromptBranch, parameter_count, patch_tokens, timestep_embedding)


def released_scb_keys() -> set[str]:
    """The diffusers key names of the released SCB (CrossAttnDownBlock2D, 2 layers, 320 ch)."""
    keys = {"controlnet_cond_embedding.weight", "controlnet_cond_embedding.bias"}
    keys |= {f"time_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for r in (0, 1):
        for m in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2"):
            keys |= {f"down_blocks.0.resnets.{r}.{m}.{p}" for p in ("weight", "bias")}
        a = f"down_blocks.0.attentions.{r}"
        for m in ("norm", "proj_in", "proj_out"):
            keys |= {f"{a}.{m}.{p}" for p in ("weight", "bias")}
        t = f"{a}.transformer_blocks.0"
        for m in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"):
            keys |= {f"{t}.{m}.{p}" for p in ("weight", "bias")}
        for attn in ("attn1", "attn2"):
            keys |= {f"{t}.{attn}.to_{x}.weight" for x in ("q", "k", "v")}
            keys |= {f"{t}.{attn}.to_out.0.{p}" for p in ("weight", "bias")}
    keys |= {f"controlnet_down_blocks.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    return keys


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(max(p[0].numel(), 1)) if p.ndim > 1 else 0.1))
    return module


def test_tpb_keys_and_forward_match_reference():
    tpb = randomize(TaskPromptBranch(), 1)
    sd = tpb.state_dict()
    assert set(sd) == {f"visual_projection.{i}.{p}" for i in (0, 1, 3, 4, 6) for p in ("weight", "bias")}
    assert sd["visual_projection.0.weight"].shape == (1024, 1024)
    assert sd["visual_projection.6.weight"].shape == (768, 1024)
    hidden = torch.randn(2, 257, 1024)
    x = hidden[:, 1:]
    for i in (0, 3):
        x = F.linear(x, sd[f"visual_projection.{i}.weight"], sd[f"visual_projection.{i}.bias"])
        x = F.layer_norm(x, (1024,), sd[f"visual_projection.{i + 1}.weight"], sd[f"visual_projection.{i + 1}.bias"], 1e-5)
        x = F.leaky_relu(x, 0.01)
    ref = F.linear(x, sd["visual_projection.6.weight"], sd["visual_projection.6.bias"])
    out = tpb(patch_tokens(hidden))
    assert out.shape == (2, 256, 768)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scb_state_dict_uses_released_key_names():
    scb = SpatialComplementBranch()
    sd = scb.state_dict()
    assert set(sd) == released_scb_keys()
    assert sd["controlnet_cond_embedding.weight"].shape == (320, 4, 3, 3)
    assert sd["time_embedding.linear_1.weight"].shape == (1280, 320)
    assert sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert sd["down_blocks.0.attentions.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert all(sd[f"controlnet_down_blocks.{i}.weight"].abs().sum() == 0 for i in range(3))


def test_timestep_embedding_is_diffusers_flip_sin_to_cos():
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    half = 160
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    ref = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # flip_sin_to_cos
    torch.testing.assert_close(timestep_embedding(t, 320), ref)


def _ref_attention(x, ctx, sd, prefix, heads):
    q = F.linear(x, sd[prefix + "to_q.weight"])
    k = F.linear(ctx, sd[prefix + "to_k.weight"])
    v = F.linear(ctx, sd[prefix + "to_v.weight"])
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (w @ v).permute(0, 2, 1, 3).reshape(b, n, c)
    return F.linear(o, sd[prefix + "to_out.0.weight"], sd[prefix + "to_out.0.bias"])


def reference_scb(sd, cond_latent, t, context, channels=320, heads=8):
    """Independent functional SCB from the diffusers 0.17 definitions (ControlNet-like, 1 block)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, sd["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.bias"])),
                    sd["time_embedding.linear_2.weight"], sd["time_embedding.linear_2.bias"])
    h = F.conv2d(cond_latent, sd["controlnet_cond_embedding.weight"], sd["controlnet_cond_embedding.bias"], padding=1)
    feats = [h]
    for r in (0, 1):
        p = f"down_blocks.0.resnets.{r}."
        y = F.conv2d(F.silu(F.group_norm(h, 32, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)),
                     sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
        y = y + F.linear(F.silu(temb), sd[p + "time_emb_proj.weight"], sd[p + "time_emb_proj.bias"])[:, :, None, None]
        y = F.conv2d(F.silu(F.group_norm(y, 32, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)),
                     sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
        h = h + y
        a = f"down_blocks.0.attentions.{r}."
        b_, c_, hh, ww = h.shape
        y = F.group_norm(h, 32, sd[a + "norm.weight"], sd[a + "norm.bias"], 1e-6)
        y = F.conv2d(y, sd[a + "proj_in.weight"], sd[a + "proj_in.bias"])
        y = y.permute(0, 2, 3, 1).reshape(b_, hh * ww, c_)
        tb = a + "transformer_blocks.0."
        ln = lambda z, n: F.layer_norm(z, (c_,), sd[tb + n + ".weight"], sd[tb + n + ".bias"], 1e-5)  # noqa: E731
        y = _ref_attention(ln(y, "norm1"), ln(y, "norm1"), sd, tb + "attn1.", heads) + y
        y = _ref_attention(ln(y, "norm2"), context, sd, tb + "attn2.", heads) + y
        g = F.linear(ln(y, "norm3"), sd[tb + "ff.net.0.proj.weight"], sd[tb + "ff.net.0.proj.bias"])
        g1, g2 = g.chunk(2, dim=-1)
        y = F.linear(g1 * F.gelu(g2), sd[tb + "ff.net.2.weight"], sd[tb + "ff.net.2.bias"]) + y
        y = y.reshape(b_, hh, ww, c_).permute(0, 3, 1, 2)
        h = F.conv2d(y, sd[a + "proj_out.weight"], sd[a + "proj_out.bias"]) + h
        feats.append(h)
    return [F.conv2d(f, sd[f"controlnet_down_blocks.{i}.weight"], sd[f"controlnet_down_blocks.{i}.bias"])
            for i, f in enumerate(feats)]


@pytest.mark.parametrize("channels", [320, 32])
def test_scb_forward_matches_reference(channels):
    scb = randomize(SpatialComplementBranch(channels=channels), 2)
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 256, 768, generator=gen)
    t = torch.tensor([999.0, 321.5])
    out = scb(cond, t, context)
    ref = reference_scb(scb.state_dict(), cond, t, context, channels=channels)
    assert len(out) == 3
    for o, r in zip(out, ref):
        assert o.shape == (2, channels, 8, 8)
        assert r.abs().max() > 1e-3  # the comparison is not between zeros
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_scb_ignores_nothing_it_should_use():
    """The output depends on the timestep, the context and the degraded latent."""
    scb = randomize(SpatialComplementBranch(channels=32), 4)
    gen = torch.Generator().manual_seed(5)
    cond, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 16, 768, generator=gen)
    base = scb(cond, torch.tensor([500.0]), ctx)[2]
    assert not torch.allclose(base, scb(cond, torch.tensor([100.0]), ctx)[2])
    assert not torch.allclose(base, scb(cond, torch.tensor([500.0]), ctx * 2)[2])
    assert not torch.allclose(base, scb(cond + 1, torch.tensor([500.0]), ctx)[2])


def test_fresh_scb_outputs_are_zero_and_plugin_start_rule():
    plugin = TaskPlugin("derain", scb_channels=32)
    out = plugin.scb(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 256, 768))
    assert all(float(o.detach().abs().max()) == 0.0 for o in out)
    assert not plugin.start_from_noise
    assert TaskPlugin("lowlight").start_from_noise and TaskPlugin("highlight").start_from_noise
    assert parameter_count(TaskPlugin().tpb) == 2 * (1024 * 1024 + 1024 + 2048) + 1024 * 768 + 768


def _aligned_selector():
    tuner = PromptTuner()
    with torch.no_grad():
        tuner.proj_v.weight.copy_(torch.eye(768))
        tuner.proj_v.bias.zero_()
        tuner.proj_t.weight.copy_(torch.eye(768))
        tuner.proj_t.bias.zero_()
    return tuner


def test_selector_matches_official_prompt_tuner_formula():
    tuner = randomize(PromptTuner(), 7)
    gen = torch.Generator().manual_seed(8)
    prompts = torch.randn(3, 256, 768, generator=gen)
    text = torch.randn(1, 768, generator=gen)
    scores = tuner(text, prompts)
    # official: max_pool1d over tokens, proj, L2-normalise, bmm with the normalised text, x exp(logit_scale)
    pooled = F.max_pool1d(prompts.permute(0, 2, 1), kernel_size=256).permute(0, 2, 1)
    vis = tuner.proj_v(pooled)
    vis = vis / vis.norm(dim=-1, keepdim=True)
    t = tuner.proj_t(text).unsqueeze(0).repeat(3, 1, 1)
    t = t / t.norm(dim=-1, keepdim=True)
    ref = (torch.bmm(vis, t.transpose(1, 2)).squeeze(1) * tuner.logit_scale.exp())[:, 0]
    torch.testing.assert_close(scores, ref)


def test_selector_picks_the_plugin_built_for_the_instruction():
    tuner = _aligned_selector()
    dirs = torch.eye(768)
    # plugin k's Fp max-pools to direction k (plus negative noise elsewhere); "rain" text = direction 1
    prompts = [(-torch.rand(256, 768)) * 0.1 + torch.outer(torch.ones(256), dirs[k]) for k in range(3)]
    text = dirs[1] - 0.05 * dirs[0] - 0.05 * dirs[2]
    null = dirs[5]
    sel = select_plugins(tuner, text, null, prompts, ["desnow", "derain", "dehaze"], RULE_OFFICIAL)
    assert sel.selected == [1]
    assert sel.names[-1] == "null" and len(sel.scores) == 4
    assert "derain" in sel.report() and "selected: derain" in sel.report()
    assert sel.scores[1] > 5  # logit scale 1/0.07 times a cosine near 1
    # two tasks asked for: both, in the given order
    sel2 = select_plugins(tuner, dirs[2] + dirs[0], null, prompts, ["desnow", "derain", "dehaze"], RULE_OFFICIAL)
    assert sel2.selected == [0, 2]
    # nothing matches: the null gets score 1 and nothing is applied
    sel3 = select_plugins(tuner, -dirs[0] - dirs[1] - dirs[2] - dirs[5], null, prompts, ["a", "b", "c"], RULE_OFFICIAL)
    assert sel3.selected == [] and sel3.scores[-1] == 1.0
    sel4 = select_plugins(tuner, text, null, prompts, ["desnow", "derain", "dehaze"], RULE_ABOVE_NULL)
    assert sel4.selected == [1]


# --- official input resizing (infer.py / demo.py arithmetic) -------------------------------------------

def _infer_py_size(width, height):
    """infer.py as written: short side < 512 -> 512 (int() of the scaled long side), else kept; then
    VaeImageProcessor's x - x % 8."""
    if width < 512 or height < 512:
        if width < height:
            new_width, new_height = 512, int((512 / width) * height)
        else:
            new_height, new_width = 512, int((512 / height) * width)
    else:
        new_height, new_width = height, width
    return new_width - new_width % 8, new_height - new_height % 8


def _demo_py_size(width, height, image_resolution=512):
    if width < height:
        new_width, new_height = image_resolution, int((image_resolution / width) * height)
    else:
        new_height, new_width = image_resolution, int((image_resolution / height) * width)
    return new_width - new_width % 8, new_height - new_height % 8


@pytest.mark.parametrize("size", [(256, 256), (200, 120), (120, 200), (511, 700), (512, 512), (513, 517),
                                  (4032, 3024), (3024, 4032), (2834, 2091), (407, 610), (640, 427), (1, 9)])
def test_official_sizes(size):
    from plugkit.nodes.diff_plugin.official_resize import official_size

    w, h = size
    assert official_size(w, h, "infer.py") == _infer_py_size(w, h)
    assert official_size(w, h, "demo.py") == _demo_py_size(w, h)
    assert official_size(w, h, "none") == (w, h)


def test_official_sizes_named_in_the_issue():
    from plugkit.nodes.diff_plugin.official_resize import official_size

    assert official_size(256, 256, "infer.py") == (512, 512)  # latent 64 x 64, not 32 x 32
    assert official_size(4032, 3024, "infer.py") == (4032, 3024)  # infer.py keeps large photos (latent 504 x 378)
    assert official_size(4032, 3024, "demo.py") == (680, 512)  # demo.py scales them to a 512 short side


def test_resize_image_keeps_an_image_the_rule_does_not_change():
    from plugkit.nodes.diff_plugin.official_resize import resize_image

    img = torch.rand(2, 520, 640, 3, generator=torch.Generator().manual_seed(0))  # not 8-bit values
    assert resize_image(img, "infer.py") is not None and torch.equal(resize_image(img, "infer.py"), img)
    assert torch.equal(resize_image(img, "demo.py"), img) is False and resize_image(img, "demo.py").shape == (2, 512, 624, 3)
    with pytest.raises(ValueError, match="unknown resize rule"):
        resize_image(img, "crop")
