"""PSNR and SSIM as super-resolution papers report them (basicsr's protocol), in JAX: batched and jit-able.

Protocol: images in [0, 1] are put on the 0..255 scale (data range 255), optionally reduced to BT.601 luma
(:func:`jsr.metrics.color.rgb_to_y`, the "Y channel" of the tables), and ``crop_border`` pixels are dropped
from every edge (papers crop the scale factor, or nothing). SSIM is Wang et al. 2004: an 11x11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) statistics, averaged over the positions where the window
lies fully inside the image and then over channels. This equals scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.

Papers compute metrics on 8-bit images read from disk; pass float model outputs through :func:`quantize_8bit`
first to reproduce their numbers exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jsr.metrics.color import rgb_to_y

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: the window of Wang et al. (scikit-image: truncate 3.5 at sigma 1.5)
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def quantize_8bit(x: jax.Array) -> jax.Array:
    """Round images in [0, 1] to the 8-bit grid (``round(clip(x) * 255) / 255``), as saving a PNG would."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0


def _prepare(x: jax.Array, y: jax.Array, crop_border: int, y_channel: bool) -> tuple[jax.Array, jax.Array, bool]:
    if x.shape != y.shape:
        raise ValueError(f"want two images (or batches) of the same shape, got {x.shape} and {y.shape}")
    single = x.ndim == 3
    if single:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ValueError(f"want [N, H, W, C] or [H, W, C] images, got shape {x.shape}")
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    else:
        x = x.astype(jnp.float32) * DATA_RANGE
        y = y.astype(jnp.float32) * DATA_RANGE
    if crop_border:
        c = int(crop_border)
        if 2 * c >= min(x.shape[1], x.shape[2]):
            raise ValueError(f"crop_border={c} leaves nothing of a {x.shape[1]}x{x.shape[2]} image")
        x = x[:, c:-c, c:-c]
        y = y[:, c:-c, c:-c]
    return x, y, single


@functools.partial(jax.jit, static_argnames=("crop_border", "y_channel"))
def psnr(x: jax.Array, y: jax.Array, *, crop_border: int = 0, y_channel: bool = True) -> jax.Array:
    """Peak signal-to-noise ratio in dB, data range 255.

    Args:
      x, y: [N, H, W, 3] (or [H, W, 3]) images in [0, 1], NHWC. With ``y_channel=False`` any channel count.
      crop_border: pixels dropped from each edge before measuring.
      y_channel: measure BT.601 luma (the SR papers' "PSNR-Y") instead of all channels.
    Returns:
      [N] float32 (a scalar for one image); ``inf`` for identical images.
    """
    x, y, single = _prepare(x, y, crop_border, y_channel)
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    out = 10.0 * jnp.log10(DATA_RANGE**2 / mse)
    return out[0] if single else out


def _gaussian_taps() -> np.ndarray:
    r = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-0.5 * (r / SSIM_SIGMA) ** 2)
    return (g / g.sum()).astype(np.float32)


def _blur_valid(x: jax.Array) -> jax.Array:
    """Separable 11-tap Gaussian, depthwise, 'valid' positions only: [N, H, W, C] -> [N, H-10, W-10, C]."""
    c = x.shape[-1]
    g = jnp.asarray(_gaussian_taps())
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.broadcast_to(g[:, None, None, None], (g.size, 1, 1, c))
    kw = jnp.broadcast_to(g[None, :, None, None], (1, g.size, 1, c))
    hi = jax.lax.Precision.HIGHEST  # a metric: never let an accelerator lower this to bf16/tf32
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                     precision=hi)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                        precision=hi)


@functools.partial(jax.jit, static_argnames=("crop_border", "y_channel"))
def ssim(x: jax.Array, y: jax.Array, *, crop_border: int = 0, y_channel: bool = True) -> jax.Array:
    """Structural similarity (Wang et al. 2004), data range 255, as the SR papers compute it.

    Args:
      x, y: [N, H, W, 3] (or [H, W, 3]) images in [0, 1], NHWC; at least 11x11 after ``crop_border``.
        With ``y_channel=False`` any channel count; channels are averaged.
      crop_border: pixels dropped from each edge before measuring.
      y_channel: measure BT.601 luma (the papers' "SSIM-Y") instead of all channels.
    Returns:
      [N] float32 in [-1, 1] (a scalar for one image); 1 for identical images.
    """
    x, y, single = _prepare(x, y, crop_border, y_channel)
    win = 2 * SSIM_RADIUS + 1
    if x.shape[1] < win or x.shape[2] < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} after cropping, got {x.shape[1:3]}")
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    # Second moments are taken about a per-image constant: E[(x-k)^2] - (mu-k)^2 is the same variance, but in
    # float32 it avoids cancelling two numbers of size ~255^2 (the error would be ~1e-2, next to c2 = 58.5).
    k = jnp.mean(x, axis=(1, 2), keepdims=True)
    xs, ys = x - k, y - k
    c = x.shape[-1]
    stats = _blur_valid(jnp.concatenate([xs, ys, xs * xs, ys * ys, xs * ys], axis=-1))
    mx, my, exx, eyy, exy = (stats[..., i * c:(i + 1) * c] for i in range(5))
    vx = exx - mx * mx
    vy = eyy - my * my
    cxy = exy - mx * my
    mx, my = mx + k, my + k
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    out = jnp.mean(num / den, axis=(1, 2, 3))
    return out[0] if single else out
