"""Host tests: PlugKitDifferentialDiffusion / PlugKitChangeMap sampling a tiny SD1.x model in ComfyUI."""
import logging

import pytest
import torch

from plugkit.nodes.differential_diffusion import change_map as cm

TOL = 1e-5
NODE = "PlugKitDifferentialDiffusion"


CFG = 1.0  # one model call per step (the machine is slow); the parity tests use CFG 2


@pytest.fixture
def env(dd_env):
    model = dd_env[0]
    yield dd_env
    assert "denoise_mask_function" not in model.model_options  # the shared model is never modified


def nodes():
    from plugkit.nodes.differential_diffusion.nodes import (
        PlugKitChangeMap,
        PlugKitDifferentialDiffusion,
    )

    return PlugKitDifferentialDiffusion, PlugKitChangeMap


def run_ours(env, change_map, *, latent=None, strength=1.0, convention="white=change", schedule="sigma",
             exact_keep=False, map_resize="bilinear", **kw):
    from tools.fixtures.models import sample

    model, lat, pos, neg = env
    lat = lat if latent is None else latent
    dd, _ = nodes()
    m, out = dd.execute(model=model, samples={"samples": lat}, change_map=change_map, strength=strength,
                        map_convention=convention, schedule=schedule, exact_keep=exact_keep,
                        map_resize=map_resize).result
    kw.setdefault("cfg", CFG)
    return sample(m, lat, pos, neg, noise_mask=out["noise_mask"], **kw)


def run_core(env, comfy_nodes, change_map, *, strength=1.0, **kw):
    from tools.fixtures.models import sample

    model, lat, pos, neg = env
    m = comfy_nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"].execute(model, strength=strength).result[0]
    s = comfy_nodes.NODE_CLASS_MAPPINGS["SetLatentNoiseMask"]().set_mask({"samples": lat}, change_map)[0]
    kw.setdefault("cfg", CFG)
    return sample(m, lat, pos, neg, noise_mask=s["noise_mask"], **kw)


def run_plain(env, *, latent=None, **kw):
    from tools.fixtures.models import sample

    model, lat, pos, neg = env
    kw.setdefault("cfg", CFG)
    return sample(model, lat if latent is None else latent, pos, neg, **kw)


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ---- parity with core DifferentialDiffusion + SetLatentNoiseMask ------------------------------

@pytest.mark.parametrize("which", ["latent_size_random", "pixel_size_gradient"])
def test_parity_with_core_at_defaults(env, comfy_nodes, which):
    if which == "latent_size_random":
        change = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    else:  # 8x the latent: our default bilinear resize is core's
        change = cm.linear_gradient(128, 128)
    ours = run_ours(env, change, cfg=2.0)
    core = run_core(env, comfy_nodes, change, cfg=2.0)
    assert maxdiff(ours, core) <= TOL
    assert maxdiff(ours, run_plain(env, cfg=2.0)) > 1e-2  # the map did something


def test_parity_with_core_on_a_hard_edged_map_needs_bilinear(env, comfy_nodes):
    """A painted hard-edged map at 8x the latent, edges off the 8-pixel grid: the default bilinear
    resize equals core (which resizes the noise mask bilinearly); area averaging releases the edge
    pixels at other steps."""
    change = torch.zeros(1, 128, 128)
    change[:, 13:61, 21:70] = 1.0
    change[:, 70:117, 50:123] = 0.5
    core = run_core(env, comfy_nodes, change)
    assert maxdiff(run_ours(env, change), core) <= TOL
    assert maxdiff(run_ours(env, change, map_resize="area"), core) > 1e-2


def test_parity_with_core_strength_blend(env, comfy_nodes):
    change = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = run_ours(env, change, strength=0.5)
    core = run_core(env, comfy_nodes, change, strength=0.5)
    assert maxdiff(ours, core) <= TOL
    assert maxdiff(ours, run_ours(env, change)) > 1e-3  # strength matters


# ---- all keep / all change ---------------------------------------------------------------------

@pytest.mark.parametrize("convention,denoise,scheduler", [
    ("white=change", 1.0, "normal"),
    ("white=keep", 1.0, "karras"),
    ("white=change", 0.6, "karras"),
    ("white=keep", 0.6, "normal"),
])
def test_all_keep_step_schedule(env, convention, denoise, scheduler):
    """schedule=step: a keep value of 1 is held up to the last step and moved there once, as the
    official loop does; with exact_keep it is held on every step, whatever the scheduler."""
    keep_map = torch.zeros(1, 16, 16) if convention == "white=change" else torch.ones(1, 16, 16)
    exact = run_ours(env, keep_map, convention=convention, schedule="step", scheduler=scheduler, denoise=denoise,
                     exact_keep=True)
    assert maxdiff(exact, env[1]) <= TOL
    moved = run_ours(env, keep_map, convention=convention, schedule="step", scheduler=scheduler, denoise=denoise)
    assert maxdiff(moved, env[1]) > 1e-3


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_all_keep_sigma_schedule(env, comfy_nodes, denoise):
    lat = env[1]
    keep_map = torch.zeros(1, 16, 16)
    # a scheduler whose last sigma stays above sigma_min: "keep" holds
    assert maxdiff(run_ours(env, keep_map, scheduler="simple", denoise=denoise), lat) <= TOL
    # normal ends at sigma_min: core frees every pixel on the final step; we reproduce that by default
    moved = run_ours(env, keep_map, scheduler="normal", denoise=denoise)
    assert maxdiff(moved, lat) > 1e-2
    if denoise == 1.0:
        assert maxdiff(moved, run_core(env, comfy_nodes, keep_map, scheduler="normal")) <= TOL
    # exact_keep holds "keep" on every scheduler, including those ending at sigma_min
    out = run_ours(env, keep_map, scheduler="normal" if denoise == 1.0 else "karras", denoise=denoise, exact_keep=True)
    assert maxdiff(out, lat) <= TOL


def test_exact_keep_frees_only_zero_change(env):
    """exact_keep changes nothing but the change == 0 pixels on the final step."""
    change = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(5))
    change[:, :, :8] = 0.0
    default = run_ours(env, change)
    exact = run_ours(env, change, exact_keep=True)
    assert maxdiff(exact[..., :8], env[1][..., :8]) <= TOL
    assert maxdiff(default[..., :8], env[1][..., :8]) > 1e-2


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_all_change_is_plain_img2img(env, denoise):
    plain = run_plain(env, denoise=denoise)
    for convention, schedule in (("white=change", "sigma"), ("white=keep", "step")) if denoise == 1.0 else \
            (("white=change", "step"), ("white=keep", "sigma")):
        change_map = torch.ones(1, 16, 16) if convention == "white=change" else torch.zeros(1, 16, 16)
        out = run_ours(env, change_map, convention=convention, schedule=schedule, denoise=denoise)
        assert maxdiff(out, plain) <= TOL, (convention, schedule)


# ---- gradients ---------------------------------------------------------------------------------

def banded_gradient(bands: int = 4, width: int = 16, height: int = 16) -> torch.Tensor:
    """A left-to-right stepped gradient of change values at the band centres (0.125 ... 0.875)."""
    col = (torch.arange(width) * bands // width).float() / bands + 0.5 / bands
    return col.view(1, 1, width).expand(1, height, width).clone()


GRADIENT_COLUMNS = 8  # measured columns, values (i + 0.5) / 8
GRADIENT_PAD = 8  # columns of 0 on the left and of 1 on the right keep the measured ones off the borders


@pytest.mark.parametrize("denoise", [1.0, 0.6])
@pytest.mark.parametrize("schedule", ["sigma", "step"])
@pytest.mark.parametrize("convention", ["white=change", "white=keep"])
def test_gradient_change_per_column_is_monotone(env, convention, schedule, denoise):
    """A left-to-right gradient map: the mean |change| of every column rises with its change value.

    The experiment removes what is not the map: every column gets the same latent and the same noise
    (rows differ), so columns differ only by the map; with N = columns + 1 steps every measured column
    is freed on a different step under both schedules (thresholds are linear in the step or, with
    the ``normal`` scheduler, in the timestep). Zero-padded convolutions treat the borders
    differently, so the measured columns sit between constant margins.
    """
    model, _, pos, neg = env
    w, pad = GRADIENT_COLUMNS, GRADIENT_PAD
    gen = torch.Generator().manual_seed(11)
    lat = (torch.randn(1, 4, 16, 1, generator=gen) * 4.0).expand(1, 4, 16, w + 2 * pad).contiguous()
    noise = torch.randn(1, 4, 16, 1, generator=gen)
    values = torch.cat([torch.zeros(pad), (torch.arange(w) + 0.5) / w, torch.ones(pad)])
    change = values.view(1, 1, -1).expand(1, 16, w + 2 * pad).clone()
    change_map = change if convention == "white=change" else 1 - change
    out = run_ours((model, lat, pos, neg), change_map, convention=convention, schedule=schedule,
                   denoise=denoise, steps=w + 1, noise=noise)
    per_column = (out - lat).abs().mean(dim=(0, 1, 2))[pad:pad + w]  # ordered by change value
    assert torch.all(per_column[1:] > per_column[:-1]), per_column
    # the least-change column is held to the last step and moved only there
    assert per_column[0] * 5 < per_column[1], per_column


# ---- batches -----------------------------------------------------------------------------------

def test_batch_of_two_with_two_maps(env):
    model, lat, pos, neg = env
    lat2 = torch.cat([lat, lat.flip(-1)])
    maps = torch.stack([torch.zeros(16, 16), torch.ones(16, 16)])  # item 0 keep, item 1 change
    out = run_ours(env, maps, latent=lat2, schedule="step", exact_keep=True)
    plain = run_plain(env, latent=lat2)
    assert maxdiff(out[0], lat2[0]) <= TOL
    assert maxdiff(out[1], plain[1]) <= TOL
    assert maxdiff(out[1], lat2[1]) > 1e-2


@pytest.mark.parametrize("schedule", ["sigma", "step"])
def test_batch_of_two_with_gradient_maps(env, schedule):
    """Two different gradients (left-to-right and right-to-left): each item follows its own map."""
    _, lat, _, _ = env
    lat2 = torch.cat([lat, lat])
    g = banded_gradient()
    maps = torch.cat([g, g.flip(-1)])
    out = run_ours(env, maps, latent=lat2, schedule=schedule, steps=8)
    col = (out - lat2).abs().mean(dim=(1, 2))  # [2, W]
    assert col[0, :4].max() < col[0, -4:].min()
    assert col[1, -4:].max() < col[1, :4].min()


def test_single_map_broadcasts_over_batch(env):
    _, lat, _, _ = env
    lat2 = torch.cat([lat, -lat])
    out = run_ours(env, torch.zeros(1, 16, 16), latent=lat2, schedule="step", exact_keep=True)
    assert maxdiff(out, lat2) <= TOL


def test_mismatched_batch_is_a_clear_error(env):
    model, lat, _, _ = env
    dd, _ = nodes()
    with pytest.raises(ValueError, match=r"PlugKitDifferentialDiffusion.*'change_map'.*3 maps.*batch of 2"):
        dd.execute(model=model, samples={"samples": torch.cat([lat, lat])}, change_map=torch.zeros(3, 16, 16))


# ---- latent output, warnings, no mutation -------------------------------------------------------

def test_latent_output_resized_converted_and_inputs_untouched(env, caplog):
    model, lat, _, _ = env
    dd, _ = nodes()
    change_map = torch.rand(1, 128, 128)
    before = change_map.clone()
    samples = {"samples": lat, "batch_index": [0]}
    with caplog.at_level(logging.WARNING):
        m, out = dd.execute(model=model, samples=samples, change_map=change_map,
                            map_convention="white=keep").result
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(change_map, before)
    assert "noise_mask" not in samples and out["batch_index"] == [0] and out["samples"] is lat
    assert out["noise_mask"].shape == (1, 1, 16, 16)
    expected = torch.nn.functional.interpolate(1 - before.unsqueeze(1), size=(16, 16), mode="bilinear")
    assert torch.allclose(out["noise_mask"], expected, atol=1e-6)
    _, area = dd.execute(model=model, samples=samples, change_map=change_map, map_convention="white=keep",
                         map_resize="area").result
    assert torch.allclose(area["noise_mask"], torch.nn.functional.avg_pool2d(1 - before.unsqueeze(1), 8), atol=1e-6)
    assert "denoise_mask_function" not in model.model_options
    assert "denoise_mask_function" in m.model_options


def test_aspect_mismatch_warns(env, caplog):
    model, lat, _, _ = env
    dd, _ = nodes()
    with caplog.at_level(logging.WARNING):
        _, out = dd.execute(model=model, samples={"samples": lat}, change_map=torch.rand(1, 64, 32)).result
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(NODE in w and "32x64" in w and "16x16" in w for w in warnings), warnings
    assert out["noise_mask"].shape == (1, 1, 16, 16)


def test_replacing_another_denoise_mask_function_warns(env, comfy_nodes, caplog):
    model, lat, _, _ = env
    core = comfy_nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"].execute(model).result[0]
    dd, _ = nodes()
    with caplog.at_level(logging.WARNING):
        m, _ = dd.execute(model=core, samples={"samples": lat}, change_map=torch.rand(1, 16, 16)).result
    assert any("already has a denoise mask function" in r.getMessage() for r in caplog.records)
    assert type(m.model_options["denoise_mask_function"]).__name__ == "DenoiseMaskSchedule"


def test_nothing_leaks_across_runs(env):
    """The step index comes from the sigmas of each run: a 0.6 run in between changes nothing."""
    from tools.fixtures.models import sample

    model, lat, pos, neg = env
    dd, _ = nodes()
    change = cm.linear_gradient(16, 16)
    m, out = dd.execute(model=model, samples={"samples": lat}, change_map=change, schedule="step").result
    first = sample(m, lat, pos, neg, noise_mask=out["noise_mask"])
    sample(m, lat, pos, neg, noise_mask=out["noise_mask"], denoise=0.6, steps=3)
    again = sample(m, lat, pos, neg, noise_mask=out["noise_mask"])
    assert torch.equal(first, again)


@pytest.mark.parametrize("where", ["one pixel", "everywhere", "inf"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_non_finite_change_map_is_a_clear_error(env, where, strength):
    """A NaN in a map used to give NaN latents (strength < 1) or the source unchanged (strength 1)."""
    model, lat, _, _ = env
    dd, _ = nodes()
    change = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(2))
    if where == "one pixel":
        change[0, 5, 7] = float("nan")
    elif where == "everywhere":
        change[:] = float("nan")
    else:
        change[0, 1, 1] = float("inf")
    kind = "infinite" if where == "inf" else "NaN"
    with pytest.raises(ValueError, match=rf"PlugKitDifferentialDiffusion: input 'change_map' holds \d+ {kind}"):
        dd.execute(model=model, samples={"samples": lat}, change_map=change, strength=strength, schedule="step")


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -0.5, 1.5])
def test_bad_strength_is_a_clear_error(env, strength):
    model, lat, _, _ = env
    dd, _ = nodes()
    with pytest.raises(ValueError, match=r"PlugKitDifferentialDiffusion: input 'strength'"):
        dd.execute(model=model, samples={"samples": lat}, change_map=torch.rand(1, 16, 16), strength=strength)


def test_bad_combo_values_are_clear_errors(env):
    model, lat, _, _ = env
    dd, _ = nodes()
    with pytest.raises(ValueError, match="map_convention"):
        dd.execute(model=model, samples={"samples": lat}, change_map=torch.rand(1, 16, 16), map_convention="black")
    with pytest.raises(ValueError, match="schedule"):
        dd.execute(model=model, samples={"samples": lat}, change_map=torch.rand(1, 16, 16), schedule="linear")
    with pytest.raises(ValueError, match="PlugKitDifferentialDiffusion: input 'map_resize'"):
        dd.execute(model=model, samples={"samples": lat}, change_map=torch.rand(1, 16, 16), map_resize="nearest")


# ---- PlugKitChangeMap --------------------------------------------------------------------------

def test_change_map_node_from_image_and_mask(comfy):
    _, cmap = nodes()
    image = torch.zeros(1, 8, 16, 3)
    image[..., :8, :] = 1.0
    out = cmap.execute(image=image, invert=True)
    mask, preview = out.result
    assert mask.shape == (1, 8, 16) and preview.shape == (1, 8, 16, 3)
    assert torch.equal(mask[0, :, :8], torch.zeros(8, 8)) and torch.equal(mask[0, :, 8:], torch.ones(8, 8))
    assert torch.equal(preview[..., 1], mask)
    assert out.ui is not None and out.ui.as_dict()["images"]
    src = torch.rand(2, 8, 8)
    before = src.clone()
    mask2, _ = cmap.execute(mask=src, levels=2, min_value=0.1, max_value=0.8).result
    assert torch.equal(src, before)
    assert mask2.min().item() == pytest.approx(0.1) and mask2.max().item() == pytest.approx(0.8)


def test_change_map_node_errors(comfy):
    _, cmap = nodes()
    with pytest.raises(ValueError, match="PlugKitChangeMap.*exactly one"):
        cmap.execute()
    with pytest.raises(ValueError, match="PlugKitChangeMap.*exactly one"):
        cmap.execute(image=torch.zeros(1, 4, 4, 3), mask=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="PlugKitChangeMap.*'image'.*alpha"):
        cmap.execute(image=torch.zeros(1, 4, 4, 3), channel="alpha")
    with pytest.raises(ValueError, match="min_value"):
        cmap.execute(mask=torch.zeros(1, 4, 4), min_value=0.9, max_value=0.1)


@pytest.mark.parametrize("name", ["gamma", "contrast", "blur_radius", "min_value", "max_value"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_change_map_non_finite_float_inputs_are_clear_errors(comfy, name, value):
    """NaN passes ComfyUI's min/max checks; ``gamma = NaN`` used to return an all-NaN map."""
    _, cmap = nodes()
    with pytest.raises(ValueError, match=rf"PlugKitChangeMap: input '{name}' is (nan|inf)"):
        cmap.execute(mask=torch.rand(1, 8, 8), **{name: value})


@pytest.mark.parametrize("source", ["image", "mask"])
def test_change_map_non_finite_source_is_a_clear_error(comfy, source):
    _, cmap = nodes()
    t = torch.rand(1, 8, 8, 3) if source == "image" else torch.rand(1, 8, 8)
    t[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"PlugKitChangeMap: input '{source}' holds \d+ NaN"):
        cmap.execute(**{source: t})


def test_change_map_feeds_differential_diffusion(env):
    """Gradient image -> PlugKitChangeMap -> PlugKitDifferentialDiffusion: the LATENT carries the map."""
    model, lat, _, _ = env
    dd, cmap = nodes()
    image = cm.linear_gradient(128, 128).unsqueeze(-1).expand(1, 128, 128, 3)
    mask, _ = cmap.execute(image=image).result
    _, out = dd.execute(model=model, samples={"samples": lat}, change_map=mask).result
    # luminance is Pillow's "L": 8-bit steps, so within half a step of the float ramp
    assert torch.allclose(out["noise_mask"][0, 0, 0], cm.linear_gradient(16, 16)[0, 0], atol=0.5 / 255 + 1e-6)
    mask709, _ = cmap.execute(image=image, channel="luminance_709").result
    _, out709 = dd.execute(model=model, samples={"samples": lat}, change_map=mask709).result
    assert torch.allclose(out709["noise_mask"][0, 0, 0], cm.linear_gradient(16, 16)[0, 0], atol=1e-5)
