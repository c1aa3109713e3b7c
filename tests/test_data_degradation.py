"""Real-ESRGAN degradation: each step, every branch forced by config, determinism, configs (jsr.data.degradation)."""

import dataclasses
import math

import cv2
import ml_collections
import numpy as np
import pytest

from jsr.data import degradation as D
from jsr.data import kernels as K
from jsr.data.sources import synthetic_image


@pytest.fixture(scope="module")
def hq():
    return synthetic_image(3, 0, 64, 64).astype(np.float32) / 255.0


def _naive_correlate(img, k):
    """Direct correlation with reflect-101 borders (numpy's 'reflect'): the reference for ``blur``."""
    r = k.shape[0] // 2
    p = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(img.shape, np.float64)
    for dy in range(k.shape[0]):
        for dx in range(k.shape[1]):
            out += k[dy, dx] * p[dy:dy + img.shape[0], dx:dx + img.shape[1]]
    return out


# ----------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("kernel", [
    K.pad_kernel(K.gaussian_kernel(9, 1.3), 21),           # rank 1: separable path, trimmed border
    K.gaussian_kernel(21, 0.9, 2.7, 0.5),                  # generic path
    K.pad_kernel(K.sinc_kernel(11, 1.4), 21),              # negative lobes
    K.pad_kernel(K.plateau_kernel(7, 1.0, 2.0, 1.0, 1.5), 21),
])
def test_blur_is_the_reflect101_correlation(hq, kernel):
    # float32 filtering (OpenCV may use a DFT for large kernels) vs float64 direct sums: 1e-5 of a [0, 1] image.
    np.testing.assert_allclose(D.blur(hq, kernel), _naive_correlate(hq, kernel.astype(np.float64)), atol=1e-5)


def test_blur_with_a_delta_is_identity(hq):
    delta = np.zeros((21, 21), np.float32)
    delta[10, 10] = 1
    np.testing.assert_array_equal(D.blur(hq, delta), hq)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_resize_shapes_and_modes(hq, mode):
    down = D.resize(hq, 20, 30, mode)
    up = D.resize(hq, 100, 90, mode)
    assert down.shape == (20, 30, 3) and up.shape == (100, 90, 3) and down.dtype == np.float32
    assert abs(float(down.mean()) - float(hq.mean())) < 0.02  # resampling keeps the mean brightness
    assert D.resize(hq, 64, 64, mode) is hq
    with pytest.raises(ValueError, match="resize mode"):
        D.resize(hq, 10, 10, "nearest-ish")


def test_gaussian_noise_statistics():
    rng = np.random.default_rng(0)
    flat = np.full((200, 200, 3), 0.5, np.float32)
    noisy = D.add_gaussian_noise(flat, rng, 10 / 255, gray=False)
    # 120k samples: the std estimate is within 1 % of 10/255 (4 standard errors ~ 0.8 %).
    assert abs(float((noisy - flat).std()) - 10 / 255) < 0.01 * 10 / 255 + 1e-6
    assert not np.allclose(noisy[..., 0], noisy[..., 1])
    gray = D.add_gaussian_noise(flat, rng, 10 / 255, gray=True)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    assert D.add_gaussian_noise(np.ones((8, 8, 3), np.float32), rng, 0.5, False).max() <= 1.0


def test_poisson_sampler_matches_the_pmf():
    """Per level: mean and variance equal lambda, and a chi-square goodness of fit against the exact pmf."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    vals = 64
    for level in (0, 3, 40, 128, 255):
        lam = level / 255 * vals
        x = D.sample_poisson_levels(np.full(200_000, level, np.uint8), vals, rng)
        if lam == 0:
            assert not x.any()
            continue
        se = math.sqrt(lam / x.size)
        assert abs(x.mean() - lam) < 5 * se
        assert abs(x.var() / lam - 1) < 5 * math.sqrt(2 / x.size) + 1e-3
        lo, hi = int(stats.poisson.ppf(1e-4, lam)), int(stats.poisson.ppf(1 - 1e-4, lam))
        observed = np.array([np.sum(x <= lo)] + [np.sum(x == k) for k in range(lo + 1, hi)] + [np.sum(x >= hi)])
        expected = x.size * np.array([stats.poisson.cdf(lo, lam)] +
                                     [stats.poisson.pmf(k, lam) for k in range(lo + 1, hi)] +
                                     [stats.poisson.sf(hi - 1, lam)])
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert stats.chi2.sf(chi2, len(observed) - 1) > 1e-4, (level, chi2)


def test_poisson_sampler_walks_past_the_guide_on_large_lambda():
    # vals = 256, every level: the whole table is exercised, no draw may exceed the support or be negative.
    x = D.sample_poisson_levels(np.arange(256, dtype=np.uint8).repeat(500), 256, np.random.default_rng(2))
    assert x.min() >= 0 and x.reshape(256, 500).mean(1)[255] == pytest.approx(256, rel=0.05)


def test_poisson_noise_follows_the_level_count_rule():
    rng = np.random.default_rng(3)
    # Two levels -> vals = 2: values in {0, 1/2, 1, ...} / 2 scaled; noise std = sqrt(img / vals) * scale.
    img = np.where(np.arange(40_000).reshape(200, 200, 1) % 2, 128 / 255, 64 / 255).astype(np.float32)
    img = np.repeat(img, 3, axis=2)
    noise = D.add_poisson_noise(img, rng, 0.1, gray=False) - img
    for level in (64, 128):
        sel = np.isclose(img, level / 255)
        expected_std = math.sqrt(level / 255 / 2) * 0.1
        assert abs(float(noise[sel].std()) / expected_std - 1) < 0.03
    gray = D.add_poisson_noise(img, rng, 0.1, gray=True)
    np.testing.assert_array_equal(gray[..., 0] - img[..., 0], gray[..., 2] - img[..., 2])


def test_jpeg_is_real_and_keeps_colours(hq):
    low, high = D.jpeg(hq, 10), D.jpeg(hq, 95)
    for out in (low, high):
        assert out.shape == hq.shape and out.dtype == np.float32
        np.testing.assert_allclose(out * 255, np.rint(out * 255), atol=1e-4)  # decoded 8-bit values
    assert np.abs(low - hq).mean() > 2 * np.abs(high - hq).mean()
    red = np.zeros((16, 16, 3), np.float32)
    red[..., 0] = 1.0
    assert D.jpeg(red, 90)[..., 0].mean() > 0.95 and D.jpeg(red, 90)[..., 2].mean() < 0.05  # RGB, not BGR


def test_quantize_and_upsample(hq):
    q = D.quantize_8bit(hq + 0.001)
    np.testing.assert_allclose(q * 255, np.rint(q * 255), atol=1e-4)
    up = D.upsample(q[:16, :16], 64, 64)
    assert up.shape == (64, 64, 3) and up.min() >= 0 and up.max() <= 1


# ----------------------------------------------------------------------------------------------- branches


def _cfg(**changes):
    """DegradationConfig with nested overrides given as 'first.resize_probs' style keys."""
    cfg = D.DegradationConfig()
    for key, value in changes.items():
        parts = key.split(".")
        objs = [cfg]
        for p in parts[:-1]:
            objs.append(getattr(objs[-1], p))
        new = dataclasses.replace(objs[-1], **{parts[-1]: value})
        for obj, p in zip(reversed(objs[:-1]), reversed(parts[:-1])):
            new = dataclasses.replace(obj, **{p: new})
        cfg = new
    return cfg


ONE_HOT = {t: tuple(1.0 if u == t else 0.0 for u in K.KERNEL_TYPES) for t in K.KERNEL_TYPES}
BRANCHES = {
    **{f"kernel_{t}": {"first.blur.probs": p, "second.blur.probs": p, "first.blur.sinc_prob": 0.0,
                       "second.blur.sinc_prob": 0.0} for t, p in ONE_HOT.items()},
    "sinc_both_passes": {"first.blur.sinc_prob": 1.0, "second.blur.sinc_prob": 1.0},
    "no_second_blur": {"second.blur.prob": 0.0},
    "resize_up": {"first.resize_probs": (1, 0, 0), "second.resize_probs": (1, 0, 0)},
    "resize_down": {"first.resize_probs": (0, 1, 0), "second.resize_probs": (0, 1, 0)},
    "resize_keep": {"first.resize_probs": (0, 0, 1), "second.resize_probs": (0, 0, 1)},
    "area_only": {"first.resize_modes": ("area",), "second.resize_modes": ("area",), "final_resize_modes": ("area",)},
    "gaussian_color": {"first.gaussian_noise_prob": 1.0, "second.gaussian_noise_prob": 1.0,
                       "first.gray_noise_prob": 0.0, "second.gray_noise_prob": 0.0},
    "gaussian_gray": {"first.gaussian_noise_prob": 1.0, "second.gaussian_noise_prob": 1.0,
                      "first.gray_noise_prob": 1.0, "second.gray_noise_prob": 1.0},
    "poisson_color": {"first.gaussian_noise_prob": 0.0, "second.gaussian_noise_prob": 0.0,
                      "first.gray_noise_prob": 0.0, "second.gray_noise_prob": 0.0},
    "poisson_gray": {"first.gaussian_noise_prob": 0.0, "second.gaussian_noise_prob": 0.0,
                     "first.gray_noise_prob": 1.0, "second.gray_noise_prob": 1.0},
    "final_resize_then_jpeg": {"final_resize_first_prob": 1.0},
    "final_jpeg_then_resize": {"final_resize_first_prob": 0.0},
    "final_sinc": {"final_sinc_prob": 1.0},
    "no_final_sinc": {"final_sinc_prob": 0.0},
    "jpeg_extremes": {"first.jpeg_quality": (1, 1), "second.jpeg_quality": (100, 100)},
}


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_every_branch_gives_valid_shapes_and_ranges(hq, branch):
    cfg = _cfg(**BRANCHES[branch])
    for seed in range(3):
        out = D.degrade(hq, seed, cfg)
        assert set(out) == {"lq", "lq_small"}
        assert out["lq_small"].shape == (16, 16, 3) and out["lq"].shape == (64, 64, 3)
        for v in out.values():
            assert v.dtype == np.float32 and np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
        np.testing.assert_allclose(out["lq_small"] * 255, np.rint(out["lq_small"] * 255), atol=1e-4)
        # The LQ still depicts the HQ: the downscaled HQ explains it better than a constant image does.
        ref = cv2.resize(hq, (16, 16), interpolation=cv2.INTER_AREA)
        assert np.abs(out["lq_small"] - ref).mean() < np.abs(ref - ref.mean()).mean() + 0.05


@pytest.mark.parametrize("a,b", [("gaussian_color", "poisson_color"), ("resize_up", "resize_down"),
                                 ("final_sinc", "no_final_sinc"), ("final_resize_then_jpeg", "final_jpeg_then_resize"),
                                 ("kernel_iso", "kernel_plateau_aniso"), ("gaussian_color", "gaussian_gray")])
def test_opposite_branches_differ(hq, a, b):
    """Forcing a branch must matter: with the same seed, opposite forced branches give different LQs."""
    for seed in range(3):
        assert not np.array_equal(D.degrade(hq, seed, _cfg(**BRANCHES[a]))["lq_small"],
                                  D.degrade(hq, seed, _cfg(**BRANCHES[b]))["lq_small"])


def test_gray_noise_is_gray():
    """With only gray noise on a gray image and no colour-mixing step, the LQ stays gray."""
    img = np.repeat(synthetic_image(1, 1, 64, 64).mean(-1, keepdims=True), 3, axis=2).astype(np.float32) / 255
    out = D.degrade(img, 0, _cfg(**BRANCHES["gaussian_gray"]))["lq_small"]
    # JPEG's chroma path rounds gray to within one level.
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 2 / 255 + 1e-6


def test_lq_is_the_bicubic_upsampling_of_lq_small(hq):
    out = D.degrade(hq, 11)
    np.testing.assert_array_equal(out["lq"], np.clip(cv2.resize(out["lq_small"], (64, 64),
                                                                interpolation=cv2.INTER_CUBIC), 0, 1))


def test_tiny_images_survive_every_size_draw():
    """An 8x8 HQ shrinks to 1-2 pixels in the first pass and 2x2 at the end; a 21x21 kernel still applies."""
    img = synthetic_image(2, 2, 8, 8).astype(np.float32) / 255
    for seed in range(30):
        out = D.degrade(img, seed)
        assert out["lq_small"].shape == (2, 2, 3) and out["lq"].shape == (8, 8, 3)
        assert np.isfinite(out["lq"]).all() and 0 <= out["lq"].min() and out["lq"].max() <= 1


def test_determinism_and_seed_sensitivity(hq):
    a, b, c = D.degrade(hq, 123), D.degrade(hq, 123), D.degrade(hq, 124)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["lq_small"], c["lq_small"])
    g = D.degrade(hq, np.random.default_rng(123))
    np.testing.assert_array_equal(g["lq"], a["lq"])  # an int seed and a Generator from it agree


def test_input_is_not_modified(hq):
    before = hq.copy()
    D.degrade(hq, 0)
    np.testing.assert_array_equal(hq, before)


def test_input_validation():
    with pytest.raises(ValueError, match="divisible"):
        D.degrade(np.zeros((30, 32, 3), np.float32), 0)
    with pytest.raises(ValueError, match="HxWx3"):
        D.degrade(np.zeros((32, 32), np.float32), 0)
    with pytest.raises(ValueError, match="float"):
        D.degrade(np.zeros((32, 32, 3), np.uint8), 0)


# ----------------------------------------------------------------------------------------------- configs


def test_defaults_are_design_values():
    c = D.DegradationConfig()
    assert c.first.blur.probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and c.first.blur.sinc_prob == 0.1
    assert c.first.blur.sigma == (0.2, 3.0) and c.second.blur.sigma == (0.2, 1.5)
    assert c.first.blur.beta_gaussian == (0.5, 4.0) and c.first.blur.beta_plateau == (1.0, 2.0)
    assert c.first.resize_probs == (0.2, 0.7, 0.1) and c.first.resize_range == (0.15, 1.5)
    assert c.first.noise_sigma == (1.0, 30.0) and c.first.poisson_scale == (0.05, 3.0)
    assert c.first.gray_noise_prob == 0.4 and c.first.jpeg_quality == (30, 95)
    assert c.second.blur.prob == 0.8 and c.second.resize_probs == (0.3, 0.4, 0.3)
    assert c.second.resize_range == (0.3, 1.2) and c.second.noise_sigma == (1.0, 25.0)
    assert c.second.poisson_scale == (0.05, 2.5) and c.second.jpeg_quality == (30, 95)
    assert c.final_resize_first_prob == 0.5 and c.final_sinc_prob == 0.8 and c.kernel_pad == 21
    assert c.first.blur.sizes == tuple(range(7, 22, 2))


def test_pisa_preset_is_milder():
    p, d = D.preset("pisa"), D.preset("realesrgan")
    assert p.first.noise_sigma == (1.0, 15.0) and p.second.noise_sigma == (1.0, 12.0)
    assert p.first.jpeg_quality == (60, 95) and p.second.jpeg_quality == (60, 100)
    assert p.second.blur.prob == 0.5 and p.first.resize_range == (0.3, 1.5)
    assert p.first.blur == d.first.blur  # same kernels
    with pytest.raises(KeyError, match="preset"):
        D.preset("nope")


def test_config_dict_round_trip_and_overrides(hq):
    cd = ml_collections.ConfigDict(D.preset("pisa").to_dict())
    assert D.resolve_config(cd) == D.preset("pisa")
    cd.second.noise_sigma = (2.0, 3.0)
    assert D.resolve_config(cd).second.noise_sigma == (2.0, 3.0)
    partial = D.resolve_config({"preset": "pisa", "first": {"blur": {"sinc_prob": 0.5}}})
    assert partial.first.blur.sinc_prob == 0.5 and partial.first.noise_sigma == (1.0, 15.0)
    assert D.resolve_config("pisa") == D.preset("pisa") and D.resolve_config(None) == D.DegradationConfig()
    with pytest.raises(KeyError, match="sigmaa"):
        D.resolve_config({"first": {"blur": {"sigmaa": (1, 2)}}})
    np.testing.assert_array_equal(D.degrade(hq, 5, cd)["lq"], D.degrade(hq, 5, D.resolve_config(cd))["lq"])


@pytest.mark.parametrize("change,message", [
    ({"first.blur.probs": (0.5, 0.5)}, "one probability each"),
    ({"first.blur.sizes": (7, 8)}, "odd"),
    ({"first.blur.sigma": (2.0, 1.0)}, "blur.sigma"),
    ({"second.resize_probs": (0, 0, 0)}, "resize_probs"),
    ({"second.resize_range": (0.3, 0.9)}, "contain 1"),
    ({"first.jpeg_quality": (30, 120)}, "jpeg_quality"),
    ({"first.gray_noise_prob": 1.5}, "gray_noise_prob"),
    ({"final_resize_modes": ("lanczos",)}, "final_resize_modes"),
    ({"kernel_pad": 19}, "kernel_pad"),
])
def test_invalid_configs_are_rejected_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**change)
