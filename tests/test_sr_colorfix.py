"""Colour fixes against their closed forms (AdaIN statistics, the à-trous pyramid via scipy's correlate)."""

import numpy as np
import pytest
import scipy.ndimage

from jsr.sr import colorfix


def _images(seed=0, shape=(2, 23, 31, 3)):
    rng = np.random.default_rng(seed)
    sr = rng.uniform(0, 1, shape).astype(np.float32)
    # The reference differs in colour (per-channel gain/offset) and content, as an LQ vs an SR would.
    ref = np.clip(0.6 * rng.uniform(0, 1, shape) + np.array([0.1, 0.3, 0.0]), 0, 1).astype(np.float32)
    return sr, ref


def _np_low(x, levels=5):
    """Independent float64 pyramid: scipy correlate with the dilated binomial kernel, 'nearest' borders
    (= edge replication at any radius)."""
    k1 = np.array([1.0, 2.0, 1.0]) / 4.0
    x = x.astype(np.float64)
    for i in range(levels):
        r = 2 ** i
        k = np.zeros(2 * r + 1)
        k[::r] = k1
        kernel = np.outer(k, k)[None, :, :, None]
        x = scipy.ndimage.correlate(x, kernel, mode="nearest")
    return x


def test_adain_matches_reference_statistics():
    sr, ref = _images()
    out = np.asarray(colorfix.color_fix(sr, ref, "adain", clip=False), np.float64)
    # Mean: exact up to f32 rounding. Std: ref's sqrt(var + eps) times sr's sqrt(var / (var + eps)); with channel
    # variances ~0.03-0.08 and eps = 1e-5 the ratio differs from 1 by < 2e-4.
    np.testing.assert_allclose(out.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), atol=2e-6)
    np.testing.assert_allclose(out.std(axis=(1, 2), ddof=1), ref.std(axis=(1, 2), ddof=1), rtol=3e-4)
    # And the full closed form, float64.
    ms, ss = sr.mean((1, 2), keepdims=True), np.sqrt(sr.var((1, 2), ddof=1, keepdims=True) + 1e-5)
    mr, sref = ref.mean((1, 2), keepdims=True), np.sqrt(ref.var((1, 2), ddof=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, (sr - ms) / ss * sref + mr, atol=1e-5)


def test_wavelet_bands_are_closed_form():
    sr, ref = _images(1)
    high, low = (np.asarray(a, np.float64) for a in colorfix.wavelet_decompose(sr))
    np.testing.assert_allclose(high + low, sr, atol=1e-5)  # telescoping sum: exact up to f32 rounding
    np.testing.assert_allclose(low, _np_low(sr), atol=1e-5)  # 5 blurs of values in [0, 1], f32
    out = np.asarray(colorfix.color_fix(sr, ref, "wavelet", clip=False), np.float64)
    # out = high(sr) + low(ref): its difference from sr is exactly low(ref) - low(sr).
    np.testing.assert_allclose(out, sr - _np_low(sr) + _np_low(ref), atol=2e-5)


def test_wavelet_low_band_is_the_references():
    _, ref = _images(2)
    flat = np.full_like(ref, 0.37)  # no high band: the fix returns the reference's low band exactly
    out = np.asarray(colorfix.color_fix(flat, ref, "wavelet", clip=False))
    np.testing.assert_allclose(out, _np_low(ref), atol=1e-5)
    same = np.asarray(colorfix.color_fix(ref, ref, "wavelet", clip=False))
    np.testing.assert_allclose(same, ref, atol=1e-5)


def test_wavelet_blur_tiny_image_replicates_edges():
    # Radius 16 on a 3x2 image: every tap falls outside and lands on the nearest edge pixel.
    x = np.random.default_rng(3).uniform(size=(1, 3, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(colorfix.wavelet_decompose(x)[1]), _np_low(x), atol=1e-6)


def test_none_clip_and_errors():
    sr, ref = _images()
    np.testing.assert_array_equal(np.asarray(colorfix.color_fix(sr, ref, "none")), sr)
    out = np.asarray(colorfix.color_fix(sr * 3 - 1, ref, "adain", clip=True))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="unknown colour fix"):
        colorfix.color_fix(sr, ref, "histogram")
    with pytest.raises(ValueError, match="one shape"):
        colorfix.color_fix(sr, ref[:, :-1], "adain")
