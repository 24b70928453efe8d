"""Pure-torch tests of the Differential Diffusion math (no ComfyUI)."""
import pytest
import torch

from plugkit.nodes.differential_diffusion import change_map as cm
from plugkit.nodes.differential_diffusion.mask_schedule import (
    blend_strength,
    sigma_free_mask,
    sigma_threshold,
    step_free_mask,
    step_index,
)


# ---- schedules -------------------------------------------------------------------------------

def test_sigma_threshold_spans_one_to_zero():
    assert sigma_threshold(10.0, 10.0, 2.0) == 1.0
    assert sigma_threshold(2.0, 10.0, 2.0) == 0.0
    assert sigma_threshold(6.0, 10.0, 2.0) == 0.5


def test_sigma_free_mask_threshold_and_exact_keep():
    change = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert sigma_free_mask(change, 0.5).tolist() == [0, 0, 1, 1]
    # threshold 0 (final step of a scheduler ending at sigma_min): core frees everything
    assert sigma_free_mask(change, 0.0).tolist() == [1, 1, 1, 1]
    assert sigma_free_mask(change, 0.0, exact_keep=True).tolist() == [0, 1, 1, 1]
    assert sigma_free_mask(change, torch.tensor(0.3), exact_keep=True).tolist() == [0, 0, 1, 1]


def test_step_index_exact_intermediate_and_restricted():
    sigmas = torch.tensor([14.6, 4.0, 1.5, 0.5, 0.0])
    assert [step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert step_index(torch.tensor(2.5), sigmas) == 1  # between steps 1 and 2: step 1 in progress
    assert step_index(20.0, sigmas) == 0
    assert step_index(0.1, sigmas) == 3
    # float32 rounding of the sigma passed to the model still maps to its step
    assert step_index(torch.tensor(4.0, dtype=torch.float16), sigmas) == 1


def test_step_index_is_stateless_across_runs():
    a = torch.tensor([10.0, 5.0, 1.0, 0.0])
    b = torch.tensor([5.0, 1.0, 0.0])  # a shorter second run (denoise < 1)
    assert step_index(5.0, a) == 1
    assert step_index(5.0, b) == 0
    assert step_index(5.0, a) == 1


def test_step_free_mask_is_the_official_rule_one_step_ahead():
    """Officially the input of step i is reset while keep > i/N; ComfyUI's sampler resets a held
    pixel's output too (the next step's input), so the pixel is held at step i while keep > (i+1)/N."""
    steps = 4
    keep = torch.linspace(0, 1, 21)
    change = 1 - keep
    for i in range(steps):
        free = step_free_mask(change, i, steps)
        official_reset_next_input = keep > (i + 1) / steps
        assert torch.equal(free.bool(), ~official_reset_next_input), i
    # keep 0 is free from step 0; keep 1 is held up to the last step and moved there (as officially),
    # unless exact_keep
    assert all(step_free_mask(torch.ones(1), i, steps).item() == 1 for i in range(steps))
    assert [step_free_mask(torch.zeros(1), i, steps).item() for i in range(steps)] == [0, 0, 0, 1]
    assert all(step_free_mask(torch.zeros(1), i, steps, exact_keep=True).item() == 0 for i in range(steps))
    assert torch.equal(step_free_mask(change[:-1], steps - 1, steps, exact_keep=True), torch.ones(20))


def test_step_free_mask_last_step_of_a_shorter_run_frees_everything():
    """Thresholds over 10 steps, a run of 6 (official SDXL at strength 0.6): nothing resets after the
    run's last step, so every pixel is free there; before it, the global rule holds."""
    change = torch.tensor([0.0, 0.2, 0.45, 1.0])
    assert step_free_mask(change, 4, 10).tolist() == [0, 0, 0, 1]  # keep 0.55 > 5/10: held
    assert step_free_mask(change, 5, 10).tolist() == [0, 0, 1, 1]
    assert step_free_mask(change, 5, 10, last_of_run=True).tolist() == [1, 1, 1, 1]
    assert step_free_mask(change, 5, 10, exact_keep=True, last_of_run=True).tolist() == [0, 1, 1, 1]


def test_step_free_mask_ties_as_the_official_float32_comparison():
    """8-bit map values equal to a threshold (51/255 = 2/10) are not held, as float32 ``map > i/N``
    decides officially, although 1 - (1 - m) is not m in float32; the next 8-bit value is held."""
    steps = 10
    for k in range(256):
        m = torch.tensor([k / 255.0], dtype=torch.float32)  # the official map, white=keep
        change = 1.0 - m  # what our node computes for map_convention white=keep
        for i in range(steps - 1):
            official_held_next = bool((m > torch.arange(steps, dtype=torch.float32)[i + 1] / steps).item())
            assert step_free_mask(change, i, steps).item() == (0 if official_held_next else 1), (k, i)


def test_step_free_mask_holds_keep_for_k_n_minus_one_steps():
    """A pixel's input is reset officially at steps 0..ceil(kN)-1; held in ComfyUI at ceil(kN)-1 steps."""
    steps = 10
    for k in (0.0, 0.3, 0.55, 0.95):
        change = torch.tensor([1.0 - k])
        held = sum(1 for i in range(steps) if step_free_mask(change, i, steps).item() == 0)
        assert held == max(int(torch.ceil(torch.tensor(k * steps)).item()) - 1, 0), k


def test_step_free_mask_rejects_zero_steps():
    with pytest.raises(ValueError):
        step_free_mask(torch.zeros(1), 0, 0)


def test_blend_strength():
    binary = torch.tensor([0.0, 1.0])
    change = torch.tensor([0.4, 0.6])
    assert torch.equal(blend_strength(binary, change, 1.0), binary)
    assert torch.allclose(blend_strength(binary, change, 0.0), change)
    assert torch.allclose(blend_strength(binary, change, 0.5), torch.tensor([0.2, 0.8]))


# ---- maps ------------------------------------------------------------------------------------

def test_conventions_and_no_mutation():
    m = torch.rand(1, 8, 8)
    before = m.clone()
    assert torch.equal(cm.to_change(m, cm.WHITE_CHANGE), m)
    assert torch.allclose(cm.to_change(m, cm.WHITE_KEEP), 1 - m)
    cm.resize_to(m, (4, 4))
    cm.build_change_map(m, is_image=False, invert=True, gamma=2, contrast=2, blur_radius=2, levels=3)
    assert torch.equal(m, before)
    with pytest.raises(ValueError):
        cm.to_change(m, "white=black")


def test_resize_area_averages_and_handles_sizes():
    m = torch.zeros(1, 16, 16)
    m[:, :, :8] = 1.0
    m[:, 0, 0] = 0.0
    small = cm.resize_to(m, (2, 2), "area")
    assert small.shape == (1, 1, 2, 2)
    assert torch.allclose(small[0, 0], torch.tensor([[63 / 64, 0.0], [1.0, 0.0]]))
    # a linear ramp: the area average equals the ramp at the latent pixel centres
    ramp = cm.linear_gradient(64, 64)
    assert torch.allclose(cm.resize_to(ramp, (8, 8), "area")[0, 0, 0], cm.linear_gradient(8, 8)[0, 0], atol=1e-6)
    # same size: an exact copy; enlarging: bilinear, stays in range
    for mode in cm.RESIZE_MODES:
        assert torch.equal(cm.resize_to(ramp, (64, 64), mode)[:, 0], ramp)
        big = cm.resize_to(torch.rand(2, 3, 5), (12, 20), mode)
        assert big.shape == (2, 1, 12, 20) and big.min() >= 0 and big.max() <= 1
    with pytest.raises(ValueError, match="resize mode"):
        cm.resize_to(ramp, (8, 8), "nearest")


def test_resize_bilinear_is_the_official_torchvision_resize():
    """Default ``bilinear`` = the official ``torchvision.transforms.Resize(size, antialias=None)``
    on a tensor, bit for bit; on a hard-edged map it differs from ``area`` (the edges)."""
    import torchvision

    gen = torch.Generator().manual_seed(0)
    painted = torch.zeros(1, 128, 96)
    painted[:, 21:77, 13:70] = 1.0  # hard edges off the 8-pixel grid
    for m in (painted, torch.rand(2, 128, 96, generator=gen)):
        official = torchvision.transforms.Resize((16, 12), antialias=None)(m)
        assert torch.equal(cm.resize_to(m, (16, 12))[:, 0], official)
        assert torch.equal(cm.resize_to(m, (16, 12), cm.RESIZE_BILINEAR)[:, 0], official)
    assert (cm.resize_to(painted, (16, 12), "area") - cm.resize_to(painted, (16, 12))).abs().max() > 0.1


def test_check_finite():
    assert cm.check_finite(torch.rand(2, 3)) is None
    assert cm.check_finite(torch.zeros(2, dtype=torch.int64)) is None
    t = torch.zeros(10)
    t[2] = float("nan")
    t[3] = float("inf")
    t[4] = float("nan")
    assert cm.check_finite(t) == "2 NaN and 1 infinite value(s) out of 10"


def test_aspect_mismatch():
    assert not cm.aspect_mismatch((512, 512), (64, 64))
    assert not cm.aspect_mismatch((520, 512), (65, 64))
    assert not cm.aspect_mismatch((16, 32), (8, 16))
    assert cm.aspect_mismatch((512, 256), (64, 64))
    assert cm.aspect_mismatch((64, 64), (64, 96))


def test_as_batch_shapes():
    assert cm.as_batch(torch.zeros(4, 5)).shape == (1, 4, 5)
    assert cm.as_batch(torch.zeros(2, 1, 4, 5)).shape == (2, 4, 5)
    with pytest.raises(ValueError):
        cm.as_batch(torch.zeros(2, 3, 4, 5))


def test_extract_channel():
    img = torch.zeros(1, 2, 2, 3)
    img[..., 0] = 1.0
    assert torch.equal(cm.extract_channel(img, "luminance"), torch.full((1, 2, 2), 76 / 255))  # PIL: 255*.299
    assert torch.allclose(cm.extract_channel(img, "luminance_709"), torch.full((1, 2, 2), 0.2126))
    assert torch.equal(cm.extract_channel(img, "red"), torch.ones(1, 2, 2))
    assert torch.equal(cm.extract_channel(img, "green"), torch.zeros(1, 2, 2))
    assert torch.allclose(cm.extract_channel(img, "average"), torch.full((1, 2, 2), 1 / 3))
    grey = torch.full((1, 2, 2, 3), 0.4)
    assert torch.allclose(cm.extract_channel(grey, "luminance_709"), torch.full((1, 2, 2), 0.4))
    assert torch.equal(cm.extract_channel(grey, "luminance"), torch.full((1, 2, 2), 102 / 255))
    with pytest.raises(ValueError, match="alpha"):
        cm.extract_channel(img, "alpha")
    with pytest.raises(ValueError, match="channel"):
        cm.extract_channel(img, "hue")
    rgba = torch.cat([img, torch.full((1, 2, 2, 1), 0.7)], -1)
    assert torch.allclose(cm.extract_channel(rgba, "alpha"), torch.full((1, 2, 2), 0.7))


def test_luminance_is_the_official_pil_l_loader():
    """``luminance`` equals the official ``map.convert("L")`` + ``ToTensor`` on an 8-bit image as
    ComfyUI's LoadImage gives it (value / 255, float32), bit for bit; Rec. 709 does not."""
    import numpy as np
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    rgb8 = torch.randint(0, 256, (24, 32, 3), generator=gen, dtype=torch.uint8)
    rgb8[0, :6] = torch.tensor([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]],
                               dtype=torch.uint8)
    pil = Image.fromarray(rgb8.numpy(), "RGB")
    official = torch.from_numpy(np.array(pil.convert("L"))).float() / 255.0  # ToTensor of an "L" image
    comfy_image = torch.from_numpy(np.array(pil).astype(np.float32) / 255.0)[None]  # LoadImage
    assert torch.equal(cm.extract_channel(comfy_image, "luminance")[0], official)
    assert (cm.extract_channel(comfy_image, "luminance_709")[0] - official).abs().max() > 0.05


def test_gamma_contrast():
    m = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(cm.gamma_contrast(m, 2.0, 1.0), m ** 2)
    assert torch.allclose(cm.gamma_contrast(m, 1.0, 2.0), torch.tensor([0.0, 0.0, 0.5, 1.0]))
    assert torch.allclose(cm.gamma_contrast(m, 1.0, 0.0), torch.full((4,), 0.5))


def test_blur_keeps_mean_range_and_softens_edges():
    m = torch.zeros(1, 32, 32)
    m[:, :, 16:] = 1.0
    b = cm.blur(m, 4.0)
    assert b.shape == m.shape and b.min() >= 0 and b.max() <= 1
    assert 0 < b[0, 5, 15] < 0.5 < b[0, 5, 16] < 1  # the edge is feathered symmetrically
    assert torch.allclose(b[0, :, 15], 1 - b[0, :, 16], atol=1e-6)
    assert torch.equal(b[0, :, 0], torch.zeros(32)) and torch.allclose(b[0, :, 31], torch.ones(32))
    assert torch.equal(cm.blur(m, 0), m)
    # a radius larger than the map still works (edges replicated)
    assert cm.blur(torch.rand(1, 3, 3), 10.0).shape == (1, 3, 3)


def test_quantise():
    m = torch.linspace(0, 1, 11)
    q = cm.quantise(m, 3)
    assert set(q.tolist()) == {0.0, 0.5, 1.0}
    assert torch.equal(cm.quantise(m, 0), m)


def test_build_change_map_pipeline_order():
    img = torch.linspace(0, 1, 8).view(1, 1, 8, 1).expand(1, 4, 8, 3)  # left-to-right ramp, [1, 4, 8, 3]
    out = cm.build_change_map(img, is_image=True, invert=True, levels=2, low=0.2, high=0.9)
    assert out.shape == (1, 4, 8)
    assert out.unique().tolist() == pytest.approx([0.2, 0.9])
    assert out[0, 0, 0] == pytest.approx(0.9)  # inverted: black becomes the high value
    with pytest.raises(ValueError):
        cm.build_change_map(img, is_image=True, low=0.8, high=0.2)
