"""PSNR / SSIM (Y and RGB, with border crops) against scikit-image.

References: ``skimage.color.rgb2ycbcr`` (BT.601 studio-swing Y, as basicsr), ``peak_signal_noise_ratio`` and
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``, all in
float64. Tolerances: ours run in float32; measured differences are < 4e-6 dB (PSNR) and < 6e-7 (SSIM), so we
allow 1e-4 dB and 1e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

skm = pytest.importorskip("skimage.metrics")
skc = pytest.importorskip("skimage.color")

from jsr.metrics.color import rgb_to_y  # noqa: E402
from jsr.metrics.psnr_ssim import psnr, quantize_8bit, ssim  # noqa: E402

PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-5


def _pair(seed: int, n: int = 2, h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """8-bit-quantised RGB pairs in [0, 1]: blocky content + noise, and a noisy, slightly shifted copy."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, h // 8, w // 8, 3))
    x = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + 0.05 * rng.standard_normal((n, h, w, 3))
    y = 0.95 * x + 0.02 + 0.06 * rng.standard_normal(x.shape)
    q = lambda a: np.round(np.clip(a, 0, 1) * 255) / 255  # noqa: E731
    return q(x), q(y)


def _ref_channels(img: np.ndarray, y_channel: bool, crop: int) -> np.ndarray:
    out = skc.rgb2ycbcr(img)[..., 0] if y_channel else img * 255.0
    return out[crop:-crop, crop:-crop] if crop else out


def _ref_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255, channel_axis=-1 if a.ndim == 3 else None)


def test_rgb_to_y_matches_skimage():
    x, _ = _pair(0)
    got = np.asarray(rgb_to_y(jnp.asarray(x, jnp.float32)))
    assert got.shape == x.shape[:-1] + (1,)
    np.testing.assert_allclose(got[..., 0], skc.rgb2ycbcr(x)[..., 0], atol=1e-4)
    corners = np.asarray(rgb_to_y(jnp.asarray([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])))[:, 0]
    np.testing.assert_allclose(corners, [16.0, 235.0], atol=1e-4)


@pytest.mark.parametrize("y_channel", [True, False])
@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_ssim_match_skimage(y_channel: bool, crop: int):
    x, y = _pair(1)
    got_p = np.asarray(psnr(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), crop_border=crop,
                            y_channel=y_channel))
    got_s = np.asarray(ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), crop_border=crop,
                            y_channel=y_channel))
    assert got_p.shape == got_s.shape == (2,)
    for i in range(2):
        a, b = _ref_channels(x[i], y_channel, crop), _ref_channels(y[i], y_channel, crop)
        assert abs(got_p[i] - skm.peak_signal_noise_ratio(a, b, data_range=255)) < PSNR_TOL_DB
        assert abs(got_s[i] - _ref_ssim(a, b)) < SSIM_TOL
    assert 0.3 < got_s.min() < 0.99  # a meaningful, not degenerate, comparison


def test_ssim_precision_on_bright_flat_images():
    """Near-white, nearly flat images: a naive E[x^2] - mu^2 in float32 cancels two numbers of ~6e4 and SSIM
    drifts by 0.3-3e-5 here (measured); the shifted moments stay below 1e-6, so this test asks for 2e-6."""
    rng = np.random.default_rng(2)
    x = np.round((0.97 + 0.01 * rng.random((4, 40, 40, 3))) * 255) / 255
    y = np.round(np.clip(x + 0.004 * rng.standard_normal(x.shape), 0, 1) * 255) / 255
    got = np.asarray(ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    ref = [_ref_ssim(_ref_channels(x[i], True, 0), _ref_channels(y[i], True, 0)) for i in range(4)]
    assert np.max(np.abs(got - ref)) < 2e-6


def test_unbatched_identical_and_quantize():
    x, y = _pair(3, n=1)
    xs, ys = jnp.asarray(x[0], jnp.float32), jnp.asarray(y[0], jnp.float32)
    assert psnr(xs, ys).shape == () and ssim(xs, ys).shape == ()
    np.testing.assert_allclose(psnr(xs, ys), psnr(xs[None], ys[None])[0], rtol=1e-6)
    assert np.isinf(float(psnr(xs, xs)))
    np.testing.assert_allclose(float(ssim(xs, xs)), 1.0, atol=1e-6)
    q = np.asarray(quantize_8bit(jnp.asarray([-0.2, 0.0, 0.5, 0.1234, 1.3])))
    np.testing.assert_allclose(q * 255, [0, 0, 128, 31, 255], atol=1e-4)


def test_bad_inputs_are_explained():
    a = jnp.zeros((1, 20, 20, 3))
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, jnp.zeros((1, 20, 16, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a, crop_border=5)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(a, a, crop_border=10)
    with pytest.raises(ValueError, match="RGB"):
        psnr(jnp.zeros((1, 20, 20, 1)), jnp.zeros((1, 20, 20, 1)))
