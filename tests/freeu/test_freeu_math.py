"""FreeU math: the Fourier filter, v1/v2 backbone scaling, presets and the patch object (no ComfyUI)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from plugkit.nodes.freeu import fourier_filter as ff
from plugkit.nodes.freeu import hooks as fp
from plugkit.nodes.freeu.backbone_scaling import scale_backbone, structure_map
from plugkit.nodes.freeu.fourier_filter import (box_slices, fourier_filter, fourier_filter_any_device,
                                                resolution_threshold)
from plugkit.nodes.freeu.hooks import FreeUPatch
from plugkit.nodes.freeu.presets import PRESETS, family_of, native_resolution, resolve


# -- references written from the official code's description (shifted spectrum, full mask) -------
def reference_filter(x, threshold, scale):
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    H, W = freq.shape[-2:]
    mask = torch.ones(freq.shape)
    cr, cc = H // 2, W // 2
    mask[..., cr - threshold:cr + threshold, cc - threshold:cc + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def reference_backbone(h, b, version):
    h = h.clone()
    half = h.shape[1] // 2
    if version == "v1":
        h[:, :half] = h[:, :half] * b
        return h
    m = h.mean(1).unsqueeze(1)
    B = m.shape[0]
    mx, _ = torch.max(m.view(B, -1), dim=-1, keepdim=True)
    mn, _ = torch.min(m.view(B, -1), dim=-1, keepdim=True)
    m = (m - mn.unsqueeze(2).unsqueeze(3)) / (mx - mn).unsqueeze(2).unsqueeze(3)
    h[:, :half] = h[:, :half] * ((b - 1) * m + 1)
    return h


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- Fourier filter --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 16, 16), (3, 2, 7, 5), (2, 2, 9, 16), (1, 1, 3, 3),
                                   (2, 5, 1, 1), (1, 3, 2, 2), (1, 2, 4, 12)])
@pytest.mark.parametrize("scale", [0.9, 0.2, 0.0, 1.7])
def test_filter_matches_reference_bitwise(shape, scale):
    x = rand(*shape, seed=sum(shape))
    out = fourier_filter(x, 1, scale)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_filter(x, 1, scale))


@pytest.mark.parametrize("threshold,shape", [(2, (1, 2, 8, 8)), (3, (2, 1, 7, 9)), (4, (1, 1, 8, 10))])
def test_filter_wider_box_matches_reference_where_it_fits(threshold, shape):
    x = rand(*shape, seed=threshold)
    assert torch.equal(fourier_filter(x, threshold, 0.5), reference_filter(x, threshold, 0.5))


def test_filter_box_wider_than_map_scales_whole_spectrum():
    x = rand(1, 2, 4, 4)
    out = fourier_filter(x, 3, 0.5)  # 2t >= size: every frequency is in the box
    torch.testing.assert_close(out, x * 0.5, atol=1e-6, rtol=0)


def test_filter_scale_one_is_identity_object():
    x = rand(1, 2, 8, 8)
    assert fourier_filter(x, 1, 1.0) is x
    assert fourier_filter_any_device(x, 1, 1.0) is x


def test_filter_zero_scale_removes_dc():
    x = rand(2, 3, 8, 8) + 5.0
    out = fourier_filter(x, 1, 0.0)
    assert x.mean(dim=(-2, -1)).abs().min() > 4.0
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-5, rtol=0)


def test_filter_high_frequencies_untouched():
    # A checkerboard lives only at the Nyquist frequency: outside the box, so it passes unchanged.
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 1, 8, 8)
    torch.testing.assert_close(fourier_filter(board, 1, 0.0), board, atol=1e-6, rtol=0)


def test_filter_non_square_box():
    x = rand(1, 2, 8, 12)
    out = fourier_filter(x, (1, 3), 0.0)
    # Reference with a (rows 2x1, cols 2x3) centred box.
    freq = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    freq[..., 3:5, 3:9] = 0
    expected = torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real
    assert torch.equal(out, expected)
    spec = torch.fft.fftn(out, dim=(-2, -1))
    # Frequencies whose mirror is also in the box vanish (the real part keeps half of the others).
    assert spec[..., 0, [0, 1, 2, 10, 11]].abs().max() < 1e-4
    orig = torch.fft.fftn(x, dim=(-2, -1))
    torch.testing.assert_close(spec[..., 2, 5], orig[..., 2, 5], atol=1e-4, rtol=0)  # outside: kept
    with pytest.raises(ValueError, match="threshold"):
        fourier_filter(x, 0, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_filter_half_precision_computed_in_float32(dtype):
    x = rand(2, 3, 8, 6, dtype=dtype)
    out = fourier_filter(x, 1, 0.2)
    assert out.dtype == dtype
    assert torch.equal(out, reference_filter(x, 1, 0.2))
    expected = reference_filter(x.float(), 1, 0.2)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_filter_batch_items_independent():
    x = rand(3, 2, 8, 8)
    whole = fourier_filter(x, 1, 0.3)
    parts = torch.cat([fourier_filter(x[i:i + 1], 1, 0.3) for i in range(3)])
    torch.testing.assert_close(whole, parts, atol=1e-6, rtol=0)


def test_box_slices():
    assert box_slices(8, 1) == [slice(0, 1), slice(7, 8)]
    assert box_slices(2, 1) == [slice(0, 2)]
    assert box_slices(5, 2) == [slice(0, 2), slice(3, 5)]


def test_resolution_threshold():
    assert resolution_threshold(1, (64, 64), (64, 64)) == (1, 1)
    assert resolution_threshold(1, (128, 128), (64, 64)) == (2, 2)
    assert resolution_threshold(1, (128, 72), (128, 128)) == (1, 1)
    assert resolution_threshold(2, (96, 192), (64, 64)) == (3, 6)
    assert resolution_threshold(1, (16, 16), (64, 64)) == (1, 1)  # never an empty box


def test_resolution_aware_filters_same_band():
    # Twice the latent size with the scaled threshold: the box doubles with the map (frequencies
    # -2..1 on each axis at 16x16, the band that -1..0 is at 8x8); frequency 3 is kept.
    x = rand(1, 1, 16, 16)
    t = resolution_threshold(1, (16, 16), (8, 8))
    assert t == (2, 2)
    spec = torch.fft.fftn(fourier_filter(x, t, 0.0), dim=(-2, -1))
    orig = torch.fft.fftn(x, dim=(-2, -1))
    for k in ((0, 0), (1, 1), (15, 15), (0, 1), (1, 15)):
        assert spec[..., k[0], k[1]].abs().max() < 1e-4  # both k and -k are in the box
    torch.testing.assert_close(spec[..., 3, 3], orig[..., 3, 3], atol=1e-4, rtol=0)
    fixed = torch.fft.fftn(fourier_filter(x, 1, 0.0), dim=(-2, -1))
    # The fixed 2x2 box holds only -1 of the +-1 pair: the real part keeps half of frequency (1, 1).
    torch.testing.assert_close(fixed[..., 1, 1], orig[..., 1, 1] * 0.5, atol=1e-4, rtol=0)


def test_cpu_fallback_logged_once(monkeypatch, caplog):
    calls = {"device": 0, "cpu": 0}
    real = ff.fourier_filter

    class FakeDevice:
        type = "mps"

        def __str__(self):
            return "mps:0"

    class Proxy:
        """Stands for a tensor on a device without torch.fft."""

        def __init__(self, t):
            self.t, self.device = t, FakeDevice()

        def cpu(self):
            return self.t

    def filt(x, threshold, scale):
        if isinstance(x, Proxy):
            calls["device"] += 1
            raise RuntimeError("fft not implemented for mps")
        calls["cpu"] += 1
        return real(x, threshold, scale)

    monkeypatch.setattr(ff, "fourier_filter", filt)
    monkeypatch.setattr(ff, "_CPU_FFT_DEVICES", set())
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    x = rand(1, 2, 8, 8)
    with caplog.at_level(logging.WARNING):
        out1 = ff.fourier_filter_any_device(Proxy(x), 1, 0.5)
        out2 = ff.fourier_filter_any_device(Proxy(x), 1, 0.5)
    assert torch.equal(out1, reference_filter(x, 1, 0.5)) and torch.equal(out2, out1)
    assert calls == {"device": 1, "cpu": 2}
    assert len([r for r in caplog.records if "CPU" in r.getMessage()]) == 1


# -- backbone --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (3, 6, 5, 7), (2, 10, 1, 3)])
def test_backbone_matches_reference_bitwise(version, shape):
    h = rand(*shape, seed=shape[1])
    expected = reference_backbone(h, 1.4, version)
    out = scale_backbone(h.clone(), 1.4, version)
    assert torch.equal(out, expected)
    assert torch.equal(out[:, shape[1] // 2:], h[:, shape[1] // 2:])  # second half untouched


def test_backbone_in_place_and_b_one_noop():
    h = rand(1, 4, 4, 4)
    same = scale_backbone(h, 1.3, "v2")
    assert same is h
    g = rand(1, 4, 4, 4)
    before = g.clone()
    scale_backbone(g, 1.0, "v2")
    assert torch.equal(g, before)
    with pytest.raises(ValueError, match="version"):
        scale_backbone(g, 1.2, "v3")


def test_v2_flat_map_is_finite_and_equals_v1():
    h = torch.full((2, 4, 1, 1), 0.5)
    h[1] = rand(4, 1, 1)
    ref = reference_backbone(h, 1.5, "v2")
    assert torch.isnan(ref).any()  # the official formula divides 0 by 0 here
    out = scale_backbone(h.clone(), 1.5, "v2")
    assert torch.isfinite(out).all()
    assert torch.equal(out, reference_backbone(h, 1.5, "v1"))


def test_v2_degenerate_sample_does_not_touch_others():
    h = rand(3, 6, 4, 4)
    h[1] = 2.0  # flat
    out = scale_backbone(h.clone(), 1.4, "v2")
    for i in (0, 2):
        assert torch.equal(out[i:i + 1], reference_backbone(h[i:i + 1], 1.4, "v2"))


def test_structure_map_per_sample_range():
    m = structure_map(rand(3, 4, 6, 5) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1, 1))
    flat = m.view(3, -1)
    assert torch.equal(flat.min(-1)[0], torch.zeros(3)) and torch.equal(flat.max(-1)[0], torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backbone_half_precision(dtype, version):
    h = rand(2, 8, 4, 6, dtype=dtype)
    out = scale_backbone(h.clone(), 1.3, version)
    assert out.dtype == dtype
    assert torch.equal(out, reference_backbone(h, 1.3, version))


# -- presets ---------------------------------------------------------------------------------------
def test_presets_values_and_auto():
    assert PRESETS["SD1.5"] == (1.5, 1.6, 0.9, 0.2)
    assert PRESETS["SDXL sweep"] == (1.1, 1.2, 0.6, 0.4)
    assert resolve("custom", 1, 2, 3, 4, ["SD15"]) == ((1, 2, 3, 4), "custom")
    assert resolve("auto", 1, 2, 3, 4, ["SD15"]) == (PRESETS["SD1.5"], "SD1.5")
    assert resolve("auto", 1, 2, 3, 4, ["SDXL"]) == (PRESETS["SDXL"], "SDXL")
    assert resolve("auto", 1, 2, 3, 4, ["SD20"])[1] == "SD2.1"
    assert resolve("SD1.4", 1, 2, 3, 4, ["SDXL"]) == (PRESETS["SD1.4"], "SD1.4")
    with pytest.raises(ValueError, match="auto"):
        resolve("auto", 1, 2, 3, 4, ["Flux"])
    assert native_resolution(["SD20"], v_prediction=True) == (768, 768)
    assert native_resolution(["SD20"], v_prediction=False) == (512, 512)
    assert native_resolution(["SDXLRefiner"]) == (1024, 1024)


# ComfyUI config class names in MRO order, for families FreeU's authors published no values for.
UNPUBLISHED = [["SDXLRefiner"], ["SSD1B", "SDXL"], ["Segmind_Vega", "SDXL"], ["KOALA_1B", "SDXL"],
               ["SVD_img2vid"], ["SV3D_p", "SV3D_u", "SVD_img2vid"], ["SD_X4Upscaler", "SD20"],
               ["Stable_Zero123"], ["SD15_instructpix2pix", "SD15"], ["SD21UnclipH", "SD20"],
               ["LotusD", "SD20"], ["MyFinetune", "SDXL"]]


@pytest.mark.parametrize("names", UNPUBLISHED, ids=lambda n: n[0])
def test_auto_refuses_families_without_published_values(names):
    # Before: auto walked the config's base classes and gave e.g. SVD and the x4 upscaler the SD2.1 set.
    assert family_of(names) is None
    with pytest.raises(ValueError) as err:
        resolve("auto", 1, 2, 3, 4, names)
    msg = str(err.value)
    assert "PlugKitFreeU" in msg and "'preset'" in msg and names[0] in msg and "custom" in msg
    assert resolve("SD2.1", 1, 2, 3, 4, names) == (PRESETS["SD2.1"], "SD2.1")  # by hand: allowed


def test_sdxl_sweep_preset_runs_v1():
    from plugkit.nodes.freeu.presets import preset_version

    assert preset_version("SDXL sweep", "v2") == "v1"
    assert preset_version("SDXL", "v2") == "v2" and preset_version("SDXL", "v1") == "v1"
    assert preset_version("custom", "v2") == "v2"


def test_native_latent_uses_the_family_vae_factor():
    from plugkit.nodes.freeu.presets import latent_factor, native_latent

    # The x4 upscaler: 512 px output crops, a 4x VAE (SD_4XUpscale_Conditioning: latent = output // 4).
    assert latent_factor(["SD_X4Upscaler", "SD20"]) == 4
    assert native_latent(["SD_X4Upscaler", "SD20"]) == (128, 128)
    assert native_latent(["SD15"]) == (64, 64)
    assert native_latent(["SVD_img2vid"]) == (72, 128)
    assert native_latent(["SD20"], v_prediction=True) == (96, 96)


# -- the patch object ------------------------------------------------------------------------------
class Sampling:
    def percent_to_sigma(self, p):
        return 999999999.9 if p <= 0 else 0.0 if p >= 1 else 10.0 * (1.0 - p)


def opts(sigma=5.0, codes=(1, 0), shape=(2, 4, 16, 16)):
    return {"sigmas": torch.tensor([sigma]), "cond_or_uncond": list(codes), "original_shape": list(shape)}


def test_patch_stages_by_channels():
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2)
    for c, (b, s) in ((32, (1.3, 0.9)), (16, (1.4, 0.2))):
        h, hsp = rand(2, c, 4, 4), rand(2, c, 4, 4, seed=1)
        h2, hsp2 = p(h.clone(), hsp, opts())
        assert torch.equal(h2, reference_backbone(h, b, "v2"))
        assert torch.equal(hsp2, reference_filter(hsp, 1, s))
    h, hsp = rand(2, 8, 4, 4), rand(2, 8, 4, 4)
    out = p(h, hsp, opts())
    assert out[0] is h and out[1] is hsp  # other stages: untouched objects


def in_run(o, patch, state):
    o[fp.RUN_KEY] = fp.FreeURun({id(patch): state})
    return o


def test_patch_gating_skips_math(monkeypatch):
    calls = []
    monkeypatch.setattr(FreeUPatch, "_apply", lambda self, h, hsp, b, s, o: calls.append(float(o["sigmas"][0])) or (h, hsp))
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, start_percent=0.2, end_percent=0.6)
    state = p.patch_run(Sampling())  # range: sigma 8.0 .. 4.0
    for sigma in (9.5, 8.5, 8.0, 6.0, 4.0, 3.9, 1.0):
        h, hsp = rand(2, 32, 4, 4), rand(2, 32, 4, 4)
        out = p(h, hsp, in_run(opts(sigma), p, state))
        if not (4.0 <= sigma <= 8.0):
            assert out[0] is h and out[1] is hsp
    assert calls == [8.0, 6.0, 4.0]
    assert p.sigma_start is None and p.sigma_end is None  # the patch object itself holds no run state
    calls.clear()
    p(rand(2, 32, 4, 4), rand(2, 32, 4, 4), opts(9.5))  # outside a run: the node's own (ungated) range
    assert calls == [9.5]


def test_patch_gating_caches_per_step(monkeypatch):
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, start_percent=0.5, end_percent=1.0)
    state = p.patch_run(Sampling())
    o = in_run(opts(9.0), p, state)
    assert p.is_active(o) is False
    o["sigmas"][0] = 1.0  # same tensor object: the step's answer is cached
    assert p.is_active(o) is False
    assert p.is_active(in_run(opts(1.0), p, state)) is True


def test_two_runs_sharing_one_patch_keep_their_own_state():
    """Since ComfyUI 0.14 clones share patch objects: one run's range or suppression never reaches another."""
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, start_percent=0.2, end_percent=0.6)
    first, second = p.patch_run(Sampling(), suppressed=True), p.patch_run(Sampling())
    assert p.is_active(in_run(opts(6.0), p, first)) is False
    assert p.is_active(in_run(opts(6.0), p, second)) is True
    assert p.is_active(in_run(opts(9.0), p, second)) is False
    assert p.is_active(opts(9.0)) is True


def test_patch_apply_to_rows():
    h, hsp = rand(4, 32, 4, 4), rand(4, 32, 4, 4, seed=3)
    full_h, full_hsp = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2)(h.clone(), hsp, opts(codes=(1, 0)))
    for mode, chosen in (("cond", slice(2, 4)), ("uncond", slice(0, 2))):
        p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to=mode)
        h2, hsp2 = p(h.clone(), hsp, opts(codes=(1, 0)))
        other = slice(0, 2) if chosen.start == 2 else slice(2, 4)
        torch.testing.assert_close(h2[chosen], full_h[chosen], atol=1e-6, rtol=0)
        torch.testing.assert_close(hsp2[chosen], full_hsp[chosen], atol=1e-6, rtol=0)
        assert torch.equal(h2[other], h[other]) and torch.equal(hsp2[other], hsp[other])
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to="uncond")
    h3, hsp3 = p(h, hsp, opts(codes=(0,)))
    assert h3 is h and hsp3 is hsp


def test_patch_identity_factors_untouched():
    p = FreeUPatch(8, 1.0, 1.0, 1.0, 1.0)
    h, hsp = rand(2, 32, 4, 4), rand(2, 32, 4, 4)
    out = p(h, hsp, opts())
    assert out[0] is h and out[1] is hsp and torch.equal(h, rand(2, 32, 4, 4))


def test_patch_resolution_aware_threshold():
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, threshold_mode="resolution-aware", reference_latent=(64, 64))
    assert p.threshold_for(opts(shape=(1, 4, 128, 64))) == (2, 1)
    assert FreeUPatch(8, 1, 1, 1, 1).threshold_for(opts(shape=(1, 4, 128, 64))) == 1
    with pytest.raises(ValueError, match="threshold_mode"):
        FreeUPatch(8, 1, 1, 1, 1, threshold_mode="big")


def test_patch_deepcopy_copies_settings():
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, start_percent=0.5, sigma_start=7.0, sigma_end=0.0)
    q = copy.deepcopy(p)
    assert q is not p and q.b1 == 1.3 and q.start_percent == 0.5
    assert (q.sigma_start, q.sigma_end) == (7.0, 0.0)
    assert getattr(q, "plugkit_freeu", False)


# -- another output-block patch before FreeU may hand on hsp=None ---------------------------------
@pytest.mark.parametrize("apply_to", ["both", "cond"])
def test_patch_hsp_none_scales_backbone_only(apply_to):
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to=apply_to)
    h = rand(4, 32, 4, 4)
    h2, hsp2 = p(h.clone(), None, opts(codes=(1, 0)))
    assert hsp2 is None
    want = reference_backbone(h, 1.3, "v2")
    rows = slice(None) if apply_to == "both" else slice(2, 4)
    assert torch.equal(h2[rows], want[rows])
    if apply_to == "cond":
        assert torch.equal(h2[:2], h[:2])


# -- video features ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_patch_5d_video_features_equal_time_batched(version):
    """A 5-D [B, C, T, H, W] feature map gets what its frames get time-batched as [B*T, C, H, W]
    (SVD's layout): v2's structure map is normalised per frame. Before: per sample over all frames."""
    B, C, T, H, W = 2, 32, 3, 8, 8
    h = rand(B, C, T, H, W, seed=4) + torch.linspace(0, 3, T).view(1, 1, T, 1, 1)  # frames differ in range
    hsp = rand(B, C, T, H, W, seed=5)
    to_batched = lambda x: x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    p = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, version=version)
    h5, hsp5 = p(h.clone(), hsp, opts(codes=(0,), shape=(B, 4, T, 16, 16)))
    h4, hsp4 = p(to_batched(h).clone(), to_batched(hsp), opts(codes=(0,), shape=(B * T, 4, 16, 16)))
    assert torch.equal(to_batched(h5), h4)
    torch.testing.assert_close(to_batched(hsp5), hsp4, atol=1e-6, rtol=0)
    # and each time-batched frame is the official per-sample rule
    assert torch.equal(h4, reference_backbone(to_batched(h), 1.3, version))


def test_structure_map_4d_unchanged_by_per_frame_rule():
    h = rand(3, 16, 8, 8, seed=6)
    assert torch.equal(scale_backbone(h.clone(), 1.4, "v2"), reference_backbone(h, 1.4, "v2"))


# -- cond / uncond by role -------------------------------------------------------------------------
def conds_of(**keys):
    """A guider's conds by key, shaped as ComfyUI's convert_cond makes them (dicts with a uuid)."""
    return {k: [dict(uuid=f"{k}-{i}", **extra) for i, extra in enumerate(v)] for k, v in keys.items()}


def test_cond_roles_by_guider_key_and_prompt_type():
    from plugkit.nodes.freeu.hooks import cond_roles

    # CFGGuider / sampling_function: [positive, negative]
    g = conds_of(positive=[{}], negative=[{}])
    assert cond_roles([g["positive"], g["negative"]], g) == ["cond", "uncond"]
    assert cond_roles([g["positive"], None], g) == ["cond", None]  # cfg 1
    # SAG's extra pass: [negative] alone
    assert cond_roles([g["negative"]], g) == ["uncond"]
    # DualCFGGuider: [negative, middle, positive]; ComfyUI marks middle prompt_type "negative"
    d = conds_of(positive=[{}], middle=[{"prompt_type": "negative"}], negative=[{}])
    assert cond_roles([d["negative"], d["middle"], d["positive"]], d) == ["uncond", "uncond", "cond"]
    # PerpNegGuider: [positive, negative, empty], empty marked "negative"
    p = conds_of(positive=[{}], negative=[{}], empty_negative_prompt=[{"prompt_type": "negative"}])
    assert cond_roles([p["positive"], p["negative"], p["empty_negative_prompt"]], p) == ["cond", "uncond", "uncond"]
    # an unknown key with no prompt_type: unknown
    u = conds_of(positive=[{}], style=[{}])
    assert cond_roles([u["style"]], u) == [None]


def test_cond_roles_copies_by_uuid_and_foreign_conds_unknown():
    from plugkit.nodes.freeu.hooks import cond_roles

    g = conds_of(positive=[{}, {}], negative=[{}])
    copy_pos = [dict(c) for c in g["positive"]][:1]  # a context window's copy of part of the list
    assert cond_roles([copy_pos, [dict(c) for c in g["negative"]]], g) == ["cond", "uncond"]
    foreign = [{"uuid": "deprecated-perpneg-empty"}]
    assert cond_roles([foreign], g) == [None]
    # the explicit prompt_type is read from the conds before processing (original_conds)
    processed = conds_of(positive=[{}], middle=[{}], negative=[{}])
    original = conds_of(positive=[{}], middle=[{"prompt_type": "negative"}], negative=[{}])
    assert cond_roles([processed["middle"]], processed, original) == ["uncond"]


def test_patch_rows_follow_roles_not_codes():
    from plugkit.nodes.freeu.hooks import ROLES_KEY

    h, hsp = rand(6, 32, 4, 4), rand(6, 32, 4, 4, seed=3)
    # DualCFG batch: chunks in the order [positive(2), middle(1), negative(0)] codes, conds [neg, mid, pos]
    o = opts(codes=(2, 1, 0))
    o[ROLES_KEY] = ["uncond", "uncond", "cond"]
    full_h, full_hsp = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2)(h.clone(), hsp, o)
    h2, hsp2 = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to="cond")(h.clone(), hsp, o)
    torch.testing.assert_close(h2[:2], full_h[:2], atol=1e-6, rtol=0)  # chunk 0 = code 2 = positive
    torch.testing.assert_close(hsp2[:2], full_hsp[:2], atol=1e-6, rtol=0)
    assert torch.equal(h2[2:], h[2:]) and torch.equal(hsp2[2:], hsp[2:])
    h3, hsp3 = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to="uncond")(h.clone(), hsp, o)
    assert torch.equal(h3[:2], h[:2])
    torch.testing.assert_close(h3[2:], full_h[2:], atol=1e-6, rtol=0)
    o[ROLES_KEY] = ["uncond", None, "cond"]  # unknown role: only 'both' patches it
    h4, _ = FreeUPatch(8, 1.3, 1.4, 0.9, 0.2, apply_to="uncond")(h.clone(), hsp, o)
    assert torch.equal(h4[:4], h[:4])
