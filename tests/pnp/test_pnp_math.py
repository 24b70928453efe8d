"""Pure-torch tests of the Plug-and-Play math: inversion, trajectory lookup, PCA (no ComfyUI)."""
import math

import pytest
import torch

from tools.bench.live_tensors import LiveTensorBytes

from plugkit.nodes.pnp.ddim_inversion import (
    SourceTrajectory,
    ddim_invert,
    injection_steps,
    step_index,
    subdivide_schedule,
)
from plugkit.nodes.pnp.feature_pca import (
    attention_pca_image,
    attention_principal_components,
    feature_pca_image,
    normalise_channels,
    principal_components,
    self_attention,
    upscale_nearest,
)

COARSE = torch.tensor([0.0, 0.03, 0.5, 1.6, 4.0, 14.6])


@torch.no_grad()
def ddim_sample(x: torch.Tensor, sigmas: torch.Tensor, denoise_fn) -> torch.Tensor:
    """Deterministic DDIM down a descending schedule (``denoise_fn(x, sigma) -> x0 estimate``): the
    reverse of ``ddim_invert``, for the round-trip test."""
    sig = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    for hi, lo in zip(sig[:-1], sig[1:]):
        eps = (x - denoise_fn(x, hi)) / hi
        x = x + (lo - hi) * eps
    return x


# ---- schedules -------------------------------------------------------------------------------

def test_subdivide_keeps_coarse_points_and_splits_each_interval():
    fine, pos = subdivide_schedule(COARSE, 4)
    assert torch.equal(fine[pos], COARSE)
    assert bool((fine[1:] > fine[:-1]).all())
    # the interval from sigma 0 is one step (official), every other interval 4
    assert pos == [0, 1, 5, 9, 13, 17]
    assert fine.numel() == 18


def test_subdivide_uses_the_timestep_warp_when_given():
    to_t = lambda s: torch.log(s) * 2.0  # noqa: E731
    to_sigma = lambda t: torch.exp(t / 2.0)  # noqa: E731
    fine, pos = subdivide_schedule(COARSE, 2, to_t=to_t, to_sigma=to_sigma)
    mid = fine[pos[3] - 1]  # between 0.5 and 1.6: geometric mean in this warp
    assert mid == pytest.approx(math.sqrt(0.5 * 1.6), rel=1e-5)


def test_subdivide_rejects_bad_schedules():
    with pytest.raises(ValueError):
        subdivide_schedule(torch.tensor([1.0, 0.5]), 2)
    with pytest.raises(ValueError):
        subdivide_schedule(COARSE, 0)


# ---- inversion -------------------------------------------------------------------------------

def test_constant_eps_inversion_and_sampling_are_exact_inverses():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    n = torch.randn(2, 4, 8, 8, generator=g)
    fine, pos = subdivide_schedule(COARSE, 3)
    traj = ddim_invert(x0, fine, lambda x, lo, hi: n, keep=pos)
    for p in pos:
        assert torch.allclose(traj[p], x0 + float(fine[p]) * n, atol=1e-5)
    back = ddim_sample(traj[pos[-1]], COARSE.flip(0), lambda x, s: x - s * n)
    assert torch.allclose(back, x0, atol=1e-5)


def _gaussian_eps(scale):
    """Exact eps of data ~ N(0, scale^2) at the latent's own sigma (the probability-flow ODE)."""
    def eps_fn(x, lo, hi):
        return x * lo / (scale ** 2 + lo ** 2)
    return eps_fn


def test_inversion_converges_with_more_substeps():
    # ODE dx/dsigma = x sigma / (s^2 + sigma^2) has x(sigma) = x0 sqrt(s^2 + sigma^2) / s
    s = 0.5
    x0 = torch.ones(1, 1, 2, 2)
    coarse = torch.tensor([0.0, 0.1, 1.0, 5.0])
    exact = float(x0[0, 0, 0, 0]) * math.sqrt(s ** 2 + 5.0 ** 2) / s
    errors = []
    for sub in (1, 2, 4, 8, 16):
        fine, pos = subdivide_schedule(coarse, sub)
        top = ddim_invert(x0, fine, _gaussian_eps(s), keep=[pos[-1]])[pos[-1]]
        errors.append(abs(float(top[0, 0, 0, 0]) - exact))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_ddim_invert_callback_and_keep():
    calls = []
    out = ddim_invert(torch.zeros(1), torch.tensor([0.0, 1.0, 2.0]), lambda x, lo, hi: torch.ones(1),
                      keep=[0, 2], callback=lambda i, n: calls.append((i, n)))
    assert sorted(out) == [0, 2]
    assert calls == [(1, 2), (2, 2)]
    assert float(out[2]) == 2.0


# ---- trajectory ------------------------------------------------------------------------------

def _trajectory():
    sig = torch.tensor([8.0, 4.0, 1.0, 0.0])
    lat = torch.stack([torch.full((1, 2, 2, 2), v) for v in (80.0, 40.0, 10.0, 0.5)])
    return SourceTrajectory(sig, lat)


def test_trajectory_exact_on_schedule():
    tr = _trajectory()
    for i, s in enumerate(tr.sigmas):
        assert tr.index_of(float(s)) == i
        assert torch.equal(tr.at(float(s)), tr.latents[i])
    assert tr.index_of(4.0 * (1 + 1e-7)) == 1
    assert tr.index_of(4.01) is None


def test_trajectory_chord_between_points_and_extension():
    tr = _trajectory()
    assert float(tr.at(2.5)[0, 0, 0, 0]) == pytest.approx(25.0)  # halfway between sigma 4 and 1
    assert float(tr.at(0.5)[0, 0, 0, 0]) == pytest.approx(5.25)
    assert float(tr.at(10.0)[0, 0, 0, 0]) == pytest.approx(100.0)  # top interval extended
    assert float(tr.at(-1.0)[0, 0, 0, 0]) == pytest.approx(0.5)


def test_trajectory_chord_is_exact_for_single_step_intervals_of_constant_eps():
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    n = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    asc = COARSE
    out = ddim_invert(x0, asc, lambda x, lo, hi: n, keep="all")
    tr = SourceTrajectory(asc.flip(0), torch.stack([out[i] for i in reversed(range(asc.numel()))]))
    assert torch.allclose(tr.at(2.2), x0 + 2.2 * n, atol=1e-5)


def test_trajectory_validation_and_device_move():
    with pytest.raises(ValueError):
        SourceTrajectory(torch.tensor([1.0, 2.0]), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        SourceTrajectory(torch.tensor([2.0, 1.0]), torch.zeros(3, 1))
    tr = _trajectory()
    assert tr.to("cpu") is tr
    assert tr.shape == (1, 2, 2, 2)
    assert tr.nbytes() == 4 * 8 * 4


def test_step_index_and_injection_steps():
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert step_index(10.0, sig) == 0
    assert step_index(5.0, sig) == 1
    assert step_index(3.0, sig) == 1  # intermediate evaluation belongs to the step it starts from
    assert step_index(1.0, sig) == 3
    assert injection_steps(50, 0.8) == 40 and injection_steps(50, 0.5) == 25  # official int(n*share)
    assert injection_steps(5, 0.0) == 0 and injection_steps(5, 1.0) == 5
    assert injection_steps(10, 0.7) == 7  # 10*0.7 = 6.999... in floats


# ---- PCA ------------------------------------------------------------------------------------

def test_principal_components_find_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.tensor([3.0, 0.0, 4.0, 0.0]) / 5
    coeff = torch.randn(200, 1, generator=g)
    data = coeff * direction * 10 + 0.01 * torch.randn(200, 4, generator=g)
    comps = principal_components(data, 3)
    assert comps.shape == (200, 3)
    corr = torch.corrcoef(torch.stack([comps[:, 0], coeff[:, 0]]))[0, 1]
    assert abs(float(corr)) > 0.999
    assert comps[:, 0].var() > 100 * comps[:, 1].var()
    # deterministic sign: the same data in another row order gives the same projections
    perm = torch.randperm(200, generator=g)
    assert torch.allclose(principal_components(data[perm], 3), comps[perm], atol=1e-4)


def test_feature_pca_image_and_normalisation():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(16, 6, 5, generator=g)
    img = feature_pca_image(feats)
    assert img.shape == (6, 5, 3)
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    flat = normalise_channels(torch.ones(2, 2, 3))
    assert torch.equal(flat, torch.full((2, 2, 3), 0.5))
    with pytest.raises(ValueError):
        feature_pca_image(torch.zeros(4, 4))


def test_self_attention_rows_are_distributions_and_image_shape():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(12, 8, generator=g)
    k = torch.randn(12, 8, generator=g)
    attn = self_attention(q, k, heads=2)
    assert attn.shape == (12, 12)
    assert torch.allclose(attn.sum(-1), torch.ones(12), atol=1e-5)
    img = attention_pca_image(q, k, 2, 3, 4)
    assert img.shape == (3, 4, 3)
    with pytest.raises(ValueError):
        attention_pca_image(q, k, 2, 5, 5)


def _old_attention_pca_image(q, k, heads, h, w):
    """The view before issue 15: the full float64 (heads, N, N) softmax, then an SVD."""
    return normalise_channels(principal_components(self_attention(q, k, heads), 3).reshape(h, w, 3))


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("bounds", [{}, {"matrix_bytes": 0, "chunk_bytes": 2**14, "basis_bytes": 2**15}])
def test_bounded_attention_pca_equals_the_full_matrix_picture(scale, bounds):
    """Same PCA coordinates (1e-5 of their scale) and picture (1e-4) as the N x N computation, with
    the matrix kept and with every pass recomputing small chunks (and restarting a small basis).
    Fails when the column mean is not removed (tried once: the coordinates then differ by > 0.2)."""
    g = torch.Generator().manual_seed(4)
    h, w, heads = 16, 12, 2
    q = torch.randn(h * w, 16, generator=g) * scale
    k = torch.randn(h * w, 16, generator=g) * scale
    old = principal_components(self_attention(q, k, heads), 3)
    new = attention_principal_components(q, k, heads, 3, **bounds)
    assert (new - old).abs().max() <= 1e-5 * float(old.abs().max())
    img = attention_pca_image(q, k, heads, h, w, **bounds)
    assert (img - _old_attention_pca_image(q, k, heads, h, w)).abs().max() <= 1e-4


def test_bounded_attention_pca_memory_stays_bounded_for_a_large_map():
    """N = 4096 tokens (a 64x64 map): the old view allocates heads x N x N float64 (256 MiB here);
    the bounded one, given 1 MiB chunks and a 2 MiB basis, never holds more than a few MiB."""
    g = torch.Generator().manual_seed(5)
    n, heads = 64 * 64, 2
    q = torch.randn(n, 16, generator=g) * 3
    k = torch.randn(n, 16, generator=g) * 3
    with LiveTensorBytes() as small:  # the tracker itself, checked on the old view at N = 1024
        principal_components(self_attention(q[:1024], k[:1024], heads), 3)
    assert small.largest >= heads * 1024 * 1024 * 8
    with LiveTensorBytes() as mem:
        comps = attention_principal_components(q, k, heads, 3, chunk_bytes=2**20, matrix_bytes=0, basis_bytes=2 * 2**20)
    assert comps.shape == (n, 3) and bool(torch.isfinite(comps).all()) and float(comps[:, 0].std()) > 0
    assert mem.largest <= 2**20 + 2**16, mem.largest
    # measured 7.1 MiB: chunk temporaries (~1.5), basis blocks and their concatenations (~4), q/k copies
    assert mem.peak <= 10 * 2**20, mem.peak
    assert mem.peak < heads * n * n * 8 / 20  # the old view: 256 MiB


def test_upscale_nearest():
    img = torch.arange(4.0).reshape(2, 2, 1)
    up = upscale_nearest(img, 2)
    assert up.shape == (4, 4, 1) and float(up[1, 1, 0]) == 0.0 and float(up[3, 3, 0]) == 3.0


# ---- official parity helpers -----------------------------------------------------------------

def test_injection_steps_truncate_like_the_official_code():
    # pnp.py: int(n_timesteps * pnp_f_t) on Python floats, no rounding: 100 * 0.29 = 28.999999999999996
    assert injection_steps(100, 0.29) == 28 == int(100 * 0.29)
    assert injection_steps(10, 0.65) == 6 and injection_steps(10, 0.35) == 3
    assert injection_steps(50, 0.65) == 32 and injection_steps(50, 0.35) == 17


def test_interval_substeps_are_uniform_in_timestep():
    from plugkit.nodes.pnp.ddim_inversion import interval_substeps

    ddim_uniform_50 = [0, 1] + list(range(21, 1000, 20))  # sigma_min, then 1, 21, ..., 981
    assert interval_substeps(ddim_uniform_50, 999) == [1] + [20] * 49  # one step per model timestep
    assert interval_substeps(ddim_uniform_50, 50) == [1] * 50  # one step per sampling step
    assert interval_substeps([0, 1, 201, 401, 601, 801], 20) == [1, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        interval_substeps([0, 1], 0)


def test_subdivide_takes_one_count_per_interval_and_rounds_timesteps():
    fine, pos = subdivide_schedule(COARSE, [1, 1, 3, 1, 2])
    assert pos == [0, 1, 2, 5, 6, 8] and torch.equal(fine[pos], COARSE)
    with pytest.raises(ValueError):
        subdivide_schedule(COARSE, [1, 2])


def test_schedule_offset_accepts_runs_on_the_trajectory_only():
    from plugkit.nodes.pnp.ddim_inversion import schedule_offset

    traj = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert schedule_offset(traj, traj) == 0
    assert schedule_offset(torch.tensor([10.0, 5.0, 2.0]), traj) == 0  # first half of a split run
    assert schedule_offset(torch.tensor([2.0, 1.0, 0.0]), traj) == 2  # second half: absolute offset
    assert schedule_offset(torch.tensor([5.0, 2.0, 0.0]), traj) == 1  # ends early at 0 (force_full_denoise)
    assert schedule_offset(torch.tensor([10.0, 5.0, 2.0 * (1 + 1e-6), 1.0, 0.0]), traj) == 0  # float tolerance
    for off in ([10.0, 6.0, 2.0, 1.0, 0.0], [10.0, 2.0, 1.0, 0.0], [12.0, 5.0, 0.0], [10.0], [10.0, 5.0, 3.0]):
        assert schedule_offset(torch.tensor(off), traj) is None, off


def test_extra_evaluations_of_two_stage_samplers():
    from plugkit.nodes.pnp.ddim_inversion import describe_sigmas, extra_evaluations

    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert extra_evaluations("sample_heun", sig) == [1, 1, 1, 0]
    assert extra_evaluations("sample_dpmpp_2s_ancestral", sig) == [1, 1, 1, 0]
    assert extra_evaluations("sample_heunpp2", sig) == [2, 2, 1, 0]
    assert extra_evaluations("sample_euler", sig) is None and extra_evaluations("", sig) is None
    assert describe_sigmas(sig) == "[10, 5, 2, 1, 0] (4 steps)"
    assert describe_sigmas(torch.linspace(10, 0, 11)) == "[10, 9, 8, ..., 1, 0] (10 steps)"


# ---- source cache, module purity -------------------------------------------------------------

def test_source_cache_keeps_tensors_only_for_the_same_key_and_model():
    """Proved to fail once (2026-12-01): without ``use``'s model-object check the cache was reused."""
    from plugkit.nodes.pnp.source_cache import SourceCache

    class Model:
        pass

    a, b = Model(), Model()
    cache = SourceCache()
    assert not cache.use("k", a, (), False)
    cache.store(1.0, {("features", 4): torch.ones(1, 2)})
    assert cache.use("k", a, (), False) and cache.lookup(1.0, [("features", 4)]) is not None
    assert cache.lookup(1.0, [("q", ("output", 4), 0)]) is None  # a layer it does not hold
    assert not cache.use("k", b, (), False) and not cache.steps  # same key, another model object
    cache.store(1.0, {("features", 4): torch.ones(1, 2)})
    assert not cache.use("k2", b, (), True) and not cache.steps and cache.on_cpu


def test_cached_index_maps_every_batch_row_to_its_cached_source_row():
    """Proved to fail once (2026-12-01): without the ``chunk % n_src`` check 3 rows got [0, 1, 0]."""
    from plugkit.nodes.pnp.source_cache import cache_layers, cached_index

    one, two = {"x": torch.zeros(1, 3)}, {"x": torch.zeros(2, 3)}
    assert cached_index(one, 4, {"cond_or_uncond": [1, 0]}).tolist() == [0, 0, 0, 0]
    assert cached_index(two, 4, {"cond_or_uncond": [1, 0]}).tolist() == [0, 1, 0, 1]
    assert cached_index(two, 3, {}) is None  # 3 rows cannot share 2 source rows
    feats, attn = cache_layers([4], [(4, 0), (5, 1)])
    assert feats == (("features", 4),)
    assert attn == (("q", ("output", 4), 0), ("k", ("output", 4), 0), ("q", ("output", 5), 1), ("k", ("output", 5), 1))


def test_math_modules_import_without_comfyui():
    """The pure-torch modules load in a fresh interpreter with no ComfyUI on the path (an added
    ``import comfy`` in any of them fails this: ComfyUI is not importable there)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from tools.harness.host import register_pack; register_pack(); "  # as ComfyUI imports it
            "import plugkit.nodes.pnp.ddim_inversion, plugkit.nodes.pnp.feature_pca, plugkit.nodes.pnp.pnp_source, "
            "plugkit.nodes.pnp.schedule, plugkit.nodes.pnp.source_cache; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('comfy', 'comfy_api')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)

def _nonlinear_eps(x, sigma):
    """A smooth, nonlinear eps model (so the official step and its DDIM undo disagree)."""
    return 0.6 * torch.tanh(1.5 * x + 0.3) / (1.0 + sigma) + 0.1 * x


def test_fixed_point_inversion_is_undone_by_ddim_sampling():
    """Each fixed-point iteration solves x_hi = x_lo + (hi - lo) * eps(x_hi, hi), the step DDIM sampling
    undoes exactly: the reconstruction error falls geometrically with k, and one iteration on the
    coarse schedule (2 evaluations per step) reconstructs better than a 20x finer plain inversion."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    coarse = torch.tensor([0.03, 0.1, 0.3, 0.7, 1.2, 2.0])

    def eps_fn(x, lo, hi):
        return _nonlinear_eps(x, hi)  # told the higher level, as the official step

    def denoise(x, s):
        return x - s * _nonlinear_eps(x, s)

    def recon_error(sigmas, k):
        top = ddim_invert(x0, sigmas, eps_fn, fixed_point_iterations=k)[sigmas.numel() - 1]
        back = ddim_sample(top, coarse.flip(0), denoise)
        return float((back - x0).norm() / x0.norm())

    errors = [recon_error(coarse, k) for k in range(4)]
    assert errors[0] > 1e-2, errors  # the plain coarse inversion does not come back
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors
    fine, _ = subdivide_schedule(coarse, 20)
    fine_plain = recon_error(fine, 0)
    assert errors[1] <= 1.1 * fine_plain, (errors, fine_plain)
    with pytest.raises(ValueError):
        ddim_invert(x0, coarse, eps_fn, fixed_point_iterations=-1)


def test_fixed_point_inversion_counts_evaluations():
    calls = []

    def eps_fn(x, lo, hi):
        calls.append((lo, hi))
        return torch.zeros_like(x)

    ddim_invert(torch.zeros(1), torch.tensor([0.5, 1.0, 2.0]), eps_fn, fixed_point_iterations=2)
    assert calls == [(0.5, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 2.0), (2.0, 2.0), (2.0, 2.0)]
