"""Colour correction of a restored image against its low-quality input: AdaIN and wavelet colour fix.

One-step diffusion restorers drift in colour (the VAE round trip and the UNet shift low frequencies), so OSEDiff,
PiSA-SR and CTSR post-correct the output against the bicubic-upsampled LQ, as StableSR introduced:

* **AdaIN** (OSEDiff's, CTSR's default): give every channel of the SR image the per-image mean and standard
  deviation of the same channel of the reference,
  ``out = (sr - mean(sr)) / std(sr) * std(ref) + mean(ref)``, statistics over H and W. ``std`` is the unbiased
  (``n - 1``) standard deviation with ``eps = 1e-5`` added to the variance, as StableSR computes it.
* **Wavelet**: split both images into high and low frequencies with an à-trous (dilated) wavelet pyramid and keep
  the SR image's high band with the reference's low band, ``out = high(sr) + low(ref)``. The pyramid blurs
  ``levels`` times (default 5) with the 3x3 binomial kernel ``[1, 2, 1]^T [1, 2, 1] / 16`` dilated by
  ``2**i`` at level ``i`` (edge-replicated borders); ``low`` is the last blur, ``high`` the sum of the per-level
  differences, so ``high + low`` is the input exactly.

All functions take NHWC float images [B, H, W, C] in [0, 1] (the correction is affine-equivariant, so [-1, 1]
inputs give the same result mapped the same way); ``sr`` and ``ref`` must have the same shape.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

ColorFix = Literal["adain", "wavelet", "none"]
METHODS: tuple[str, ...] = ("adain", "wavelet", "none")

# 3x3 binomial (B1-spline) kernel of the à-trous wavelet transform.
_KERNEL = jnp.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], jnp.float32) / 16.0


def _check(sr: jax.Array, ref: jax.Array) -> None:
    if sr.ndim != 4 or sr.shape != ref.shape:
        raise ValueError(f"colour fix wants two NHWC images of one shape, got {sr.shape} and {ref.shape}")


def channel_stats(x: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and ``sqrt(unbiased var + eps)`` of ``x`` [B, H, W, C]; each [B, 1, 1, C]."""
    x = x.astype(jnp.float32)
    n = x.shape[1] * x.shape[2]
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.sum(jnp.square(x - mean), axis=(1, 2), keepdims=True) / max(n - 1, 1)
    return mean, jnp.sqrt(var + eps)


@jax.jit
def adain(sr: jax.Array, ref: jax.Array) -> jax.Array:
    """AdaIN colour fix: ``sr`` with the channel mean/std of ``ref``; both [B, H, W, C] in [0, 1]; float32 out,
    not clipped."""
    _check(sr, ref)
    m_s, s_s = channel_stats(sr)
    m_r, s_r = channel_stats(ref)
    return (sr.astype(jnp.float32) - m_s) / s_s * s_r + m_r


def wavelet_blur(x: jax.Array, radius: int) -> jax.Array:
    """One level of the à-trous pyramid: the 3x3 binomial kernel dilated by ``radius`` (taps ``radius`` pixels
    apart), per channel, borders replicated. ``x`` [B, H, W, C] -> same shape, float32."""
    x = x.astype(jnp.float32)
    c = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    kernel = jnp.tile(_KERNEL[:, :, None, None], (1, 1, 1, c))  # HWIO, depthwise: I = 1, O = C
    return jax.lax.conv_general_dilated(
        xp, kernel, window_strides=(1, 1), padding="VALID", rhs_dilation=(radius, radius),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)


def wavelet_decompose(x: jax.Array, levels: int = 5) -> tuple[jax.Array, jax.Array]:
    """``(high, low)`` of ``x`` [B, H, W, C]: ``low`` is ``x`` blurred at radii 1, 2, ..., 2**(levels-1) in turn,
    ``high = x - low`` accumulated level by level (so ``high + low == x`` up to rounding)."""
    if levels < 1:
        raise ValueError(f"wavelet levels must be >= 1, got {levels}")
    x = x.astype(jnp.float32)
    high = jnp.zeros_like(x)
    for i in range(levels):
        low = wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, low


@partial(jax.jit, static_argnames="levels")
def wavelet(sr: jax.Array, ref: jax.Array, levels: int = 5) -> jax.Array:
    """Wavelet colour fix ``high(sr) + low(ref)``; both [B, H, W, C] in [0, 1]; float32 out, not clipped."""
    _check(sr, ref)
    high, _ = wavelet_decompose(sr, levels)
    _, low = wavelet_decompose(ref, levels)
    return high + low


def color_fix(sr: jax.Array, ref: jax.Array, method: str = "adain", clip: bool = True) -> jax.Array:
    """Apply ``method`` (``adain``, ``wavelet`` or ``none``) to ``sr`` against ``ref`` (both [B, H, W, C] in
    [0, 1]); the result is float32, clipped to [0, 1] when ``clip``."""
    if method == "adain":
        out = adain(sr, ref)
    elif method == "wavelet":
        out = wavelet(sr, ref)
    elif method == "none":
        out = jnp.asarray(sr, jnp.float32)
    else:
        raise ValueError(f"unknown colour fix {method!r}; want one of {METHODS}")
    return jnp.clip(out, 0.0, 1.0) if clip else out


# Images with at least this many pixels are colour-fixed in bands of rows, in place (:func:`color_fix_inplace`):
# the whole-image programs hold ~4 image-sized float32 buffers beside the output (576 MB each at 8000x6000).
BANDED_FROM = 1 << 23
# Rows per band, and the wavelet pyramid's reach: the blurs at radii 1, 2, ..., 2**(levels-1) move information at
# most 2**levels - 1 rows, so a band computed with that many rows of context on each side is exact.
BAND_ROWS = 256


def color_fix_inplace(sr: np.ndarray, ref: np.ndarray, method: str = "adain", levels: int = 5,
                      band_rows: int = BAND_ROWS) -> np.ndarray:
    """:func:`color_fix` with ``clip=True`` for large images, written over ``sr`` band by band so that memory
    beyond the two images is a few bands: ``sr`` and ``ref`` are float32 numpy [B, H, W, C] in [0, 1] (``sr``
    writable; ``ref`` only read). Returns ``sr``.

    AdaIN: the statistics are summed band by band in float64, then the affine map is applied in place (the same
    formula as :func:`adain`; the result differs from it by float32 rounding of the statistics, ~1e-6). Wavelet:
    each band is decomposed with ``2**levels - 1`` rows of context from its neighbours (the pyramid's reach), so
    it equals the whole-image transform up to rounding; the original rows a later band needs as context are kept
    before a band is overwritten.
    """
    if sr.ndim != 4 or sr.shape != ref.shape:
        raise ValueError(f"colour fix wants two NHWC images of one shape, got {sr.shape} and {ref.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown colour fix {method!r}; want one of {METHODS}")
    if sr.dtype != np.float32 or not sr.flags.writeable:
        raise ValueError("color_fix_inplace writes over sr: it must be a writable float32 numpy array")
    h = sr.shape[1]
    bands = [(r, min(h, r + band_rows)) for r in range(0, h, band_rows)]
    if method == "adain":
        m_s, s_s = _channel_stats_banded(sr, bands)
        m_r, s_r = _channel_stats_banded(ref, bands)
        scale = (s_r / s_s).astype(np.float32)
        for r0, r1 in bands:
            part = sr[:, r0:r1]
            part -= m_s.astype(np.float32)
            part *= scale
            part += m_r.astype(np.float32)
    elif method == "wavelet":
        reach = 2 ** levels - 1
        above = sr[:, :0].copy()  # original rows just above the current band (overwritten already in sr)
        for r0, r1 in bands:
            lo, hi = max(0, r0 - reach), min(h, r1 + reach)
            sr_slab = np.concatenate([above, sr[:, r0:hi]], axis=1)
            out = np.asarray(wavelet(sr_slab, ref[:, lo:hi], levels))[:, r0 - lo:r1 - lo]
            above = np.concatenate([above, sr[:, r0:r1]], axis=1)[:, -reach:].copy()  # before it is overwritten
            sr[:, r0:r1] = out
    for r0, r1 in bands:
        np.clip(sr[:, r0:r1], 0.0, 1.0, out=sr[:, r0:r1])
    return sr


def _channel_stats_banded(x: np.ndarray, bands: list[tuple[int, int]], eps: float = 1e-5):
    """:func:`channel_stats` of numpy ``x`` [B, H, W, C] summed band by band in float64; each [B, 1, 1, C]."""
    n = x.shape[1] * x.shape[2]
    total = sum(x[:, r0:r1].sum(axis=(1, 2), keepdims=True, dtype=np.float64) for r0, r1 in bands)
    mean = total / n
    sq = sum(np.square(x[:, r0:r1] - mean).sum(axis=(1, 2), keepdims=True) for r0, r1 in bands)
    return mean, np.sqrt(sq / max(n - 1, 1) + eps)
