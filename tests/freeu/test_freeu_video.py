"""Host tests: FreeU on a tiny SVD-layout video U-Net built with ComfyUI's own classes.

ComfyUI's SVD (``supported_models.SVD_img2vid`` -> ``model_base.SVD_img2vid``) is an ``UNetModel``
with ``VideoResBlock``s and ``SpatialVideoTransformer``s; its features are time-batched
([chunks * frames, C, H, W]), so the output-block patch sees every frame as a batch row. The 5-D
layout ([B, C, T, H, W]) is covered in test_freeu_math.py (it equals the time-batched result).
"""
from __future__ import annotations

import pytest
import torch

TOL = 1e-5
FRAMES = 2
MC = 64  # SVD's unet_extra_config fixes 64-channel heads: the smallest width with whole heads


@pytest.fixture(scope="module")
def svd(comfy):
    """A tiny SVD_img2vid (3 levels, 64 base channels, temporal res blocks and attention)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from tools.fixtures.models import passthrough_init, random_init

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": 768, "in_channels": 8,
           "model_channels": MC, "num_res_blocks": [2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
           "context_dim": 64, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1],
           # what comfy.model_detection sets for a video U-Net
           "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
           "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
           "use_temporal_attention": True, "disable_temporal_crossattention": False}
    config = comfy.supported_models.SVD_img2vid(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, 0)
    passthrough_init(model.diffusion_model)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    from tools.fixtures.models import random_conditioning

    pos = random_conditioning(tokens=1, dim=64, seed=1)
    neg = random_conditioning(tokens=1, dim=64, seed=2)
    return patcher, torch.zeros(FRAMES, 4, 16, 16), pos, neg


def ours(model, **kw):
    from plugkit.nodes.freeu.nodes import PlugKitFreeU

    kw = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, **kw}
    return PlugKitFreeU.execute(model=model, **kw).result[0]


def run(svd, model, steps=2):
    from tools.fixtures.models import sample

    _, latent, pos, neg = svd
    return sample(model, latent, pos, neg, steps=steps, cfg=2.0)


def test_svd_is_a_video_unet(svd):
    from comfy.ldm.modules.diffusionmodules.openaimodel import VideoResBlock

    unet = svd[0].model.diffusion_model
    assert any(isinstance(m, VideoResBlock) for m in unet.output_blocks.modules())
    assert type(svd[0].model).__name__ == "SVD_img2vid"


def test_svd_matches_core_freeu_v2_and_uses_channel_stages(svd, comfy_nodes, monkeypatch):
    from plugkit.nodes.freeu.hooks import FreeUPatch

    model = svd[0]
    base = run(svd, model)
    core = run(svd, comfy_nodes.NODE_CLASS_MAPPINGS["FreeU_V2"]().patch(model, 1.3, 1.4, 0.9, 0.2)[0])
    seen = []
    real = FreeUPatch._apply
    monkeypatch.setattr(FreeUPatch, "_apply",
                        lambda self, h, hsp, b, s, o: seen.append((o["block"][1], h.shape)) or real(self, h, hsp, b, s, o))
    mine = run(svd, ours(model))
    assert (core - base).abs().max() > 1e-3  # FreeU really acts on this model
    assert (mine - core).abs().max() <= TOL
    # 3-level decoder: 4 concats at 4x base channels (blocks 0-3), 3 at 2x (blocks 4-6); time-batched
    # rows: [cond frames, uncond frames].
    assert sorted({(blk, shape[1]) for blk, shape in seen}) == (
        [(i, 4 * MC) for i in range(4)] + [(i, 2 * MC) for i in range(4, 7)])
    assert {shape[0] for _, shape in seen} == {2 * FRAMES}


def test_svd_apply_to_takes_whole_frame_chunks(svd, monkeypatch):
    from plugkit.nodes.freeu.hooks import FreeUPatch

    rows = []
    real = FreeUPatch._apply
    monkeypatch.setattr(FreeUPatch, "_apply",
                        lambda self, h, hsp, b, s, o: rows.append(h.shape[0]) or real(self, h, hsp, b, s, o))
    out = run(svd, ours(svd[0], apply_to="cond"), steps=1)
    assert rows and set(rows) == {FRAMES} and torch.isfinite(out).all()


def test_svd_auto_preset_refused_and_native_latent(svd, caplog):
    """No published FreeU values exist for SVD: auto says so (before: it silently used SD2.1's).
    The resolution-aware reference is SVD's 576x1024 at 8x: a 72x128 latent."""
    with pytest.raises(ValueError, match=r"PlugKitFreeU: input 'preset'.*SVD_img2vid"):
        ours(svd[0], preset="auto")
    patch = [p for p in svd[0].clone().model_options["transformer_options"].get("patches", {})
             .get("output_block_patch", [])]
    assert patch == []  # the input model is untouched by the refused call
    m = ours(svd[0], preset="SD2.1", threshold_mode="resolution-aware")
    freeu = m.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    assert freeu.reference_latent == (72, 128)
