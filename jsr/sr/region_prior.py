"""CODSR's region-adaptive generative-prior activation: how much noise each region of the LQ latent gets before the
one UNet step, from the LQ image's local gradient energy, and the step's x0 read-out.

Released code (``codsr.py``: ``ChannelwiseSobel(mode="fast")``, ``GraygradToWeight_Patchwise_Sobel``,
``eps_to_mu_coeff``), images NHWC::

    g      = 0.299 R + 0.587 G + 0.114 B                of the LQ image mapped to [0, 1]
    G      = |Sobel_x * g| + |Sobel_y * g|              3x3, replicate padding ("fast" mode: L1, not L2)
    m      = mean of G over 16 x 16-pixel patches       (the image replicate-padded bottom/right to a multiple
                                                         of 16, as the release's inference path does)
    w      = 0.3 if m <= 0.15;  7 (m - 0.15) + 0.3 if 0.15 < m <= 0.25;  1 above       (continuous at both knots)
    W      = w repeated to 2 x 2 latents per patch (16 px = 2 latents of 8 px), cropped to the latent grid
    eps_a  = W n,   n ~ N(0, I)
    z_t    = sqrt(abar_t) z_L + sqrt(1 - abar_t) eps_a
    k      = sqrt(1 - abar_t) / sqrt(abar_t)
    z_hat  = z_L + k (eps_a - eps_hat)                  eps_hat = the UNet's noise prediction at (z_t, t)

``z_hat`` is exactly ``x0(z_t, eps_hat, t)`` rewritten around ``z_L``: flat regions (small ``m``) get 0.3 of the
noise, so the prior adds little there; textured ones get all of it. The same ``k`` divides the SFT modulation
(:mod:`jsr.models.sft`). Training draws ``t`` uniform on the integers [50, 250]; inference uses 100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsr.sr import schedule as sched
from jsr.sr.schedule import DDPMSchedule

GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as the release's rgb_to_gray
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class WeightOptions:
    """The patch weight's constants (the release's, hard-coded there).

    Attributes:
      patch: patch side in pixels (16 = 2 latents).
      low, high: the knots of the gradient mean ``m``.
      floor: the weight at and below ``low``.
      slope: the weight's slope on ``(low, high]``; ``floor + slope (high - low)`` should be 1 (it is: 0.3 + 0.7).
    """

    patch: int = 16
    low: float = 0.15
    high: float = 0.25
    floor: float = 0.3
    slope: float = 7.0


def gray(x01: jax.Array) -> jax.Array:
    """Luma of RGB images [B, H, W, 3] in [0, 1] -> [B, H, W] float32."""
    x = x01.astype(jnp.float32)
    return GRAY[0] * x[..., 0] + GRAY[1] * x[..., 1] + GRAY[2] * x[..., 2]


def sobel_l1(g: jax.Array) -> jax.Array:
    """``|gx| + |gy|`` of single-channel images [B, H, W] with 3x3 Sobel kernels and replicate padding (the
    release's ``ChannelwiseSobel(mode="fast")``), [B, H, W] float32."""
    p = jnp.pad(g.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = g.shape[1], g.shape[2]
    gx = jnp.zeros(g.shape, jnp.float32)
    gy = jnp.zeros(g.shape, jnp.float32)
    for i in range(3):
        for j in range(3):
            win = p[:, i:i + h, j:j + w]
            gx = gx + _SOBEL_X[i][j] * win
            gy = gy + _SOBEL_X[j][i] * win  # the y kernel is the x kernel transposed
    return jnp.abs(gx) + jnp.abs(gy)


def patch_means(g: jax.Array, patch: int = 16) -> jax.Array:
    """Means over ``patch x patch`` blocks of [B, H, W], after replicate-padding bottom/right to multiples of
    ``patch``: [B, ceil(H / patch), ceil(W / patch)]."""
    b, h, w = g.shape
    ph, pw = -h % patch, -w % patch
    if ph or pw:
        g = jnp.pad(g, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return g.reshape(b, (h + ph) // patch, patch, (w + pw) // patch, patch).mean(axis=(2, 4))


def piecewise_weight(m: jax.Array, opts: WeightOptions = WeightOptions()) -> jax.Array:
    """The release's weight of gradient means ``m`` (any shape): ``floor`` up to ``low``, linear with ``slope``
    on ``(low, high]``, 1 above."""
    mid = opts.slope * (m - opts.low) + opts.floor
    return jnp.where(m <= opts.low, opts.floor, jnp.where(m <= opts.high, mid, 1.0)).astype(jnp.float32)


def region_weight(x_lq: jax.Array, latent_hw: tuple[int, int], opts: WeightOptions = WeightOptions(),
                  factor: int = 8) -> jax.Array:
    """The noise weight map ``W`` of LQ images ``x_lq`` [B, H, W, 3] in **[-1, 1]** on a latent grid
    ``latent_hw = (h, w)`` (``factor`` pixels per latent): [B, h, w, 1] float32 in [floor, 1]. No gradient
    flows through it (a data-dependent constant)."""
    x_lq = jax.lax.stop_gradient(x_lq)
    m = patch_means(sobel_l1(gray(x_lq * 0.5 + 0.5)), opts.patch)
    w = piecewise_weight(m, opts)
    rep = max(1, opts.patch // factor)
    w = jnp.repeat(jnp.repeat(w, rep, axis=1), rep, axis=2)
    h, wd = latent_hw
    if w.shape[1] < h or w.shape[2] < wd:
        raise ValueError(f"region_weight: an image of {x_lq.shape[1]}x{x_lq.shape[2]} px covers "
                         f"{w.shape[1]}x{w.shape[2]} latents, fewer than the {h}x{wd} asked for")
    return w[:, :h, :wd, None]


def timestep_coeff(schedule: DDPMSchedule, t: jax.Array) -> jax.Array:
    """``k = sqrt(1 - abar_t) / sqrt(abar_t)`` for timesteps ``t`` (scalar or [B]), float32 of ``t``'s shape."""
    abar = sched.alpha_bar(schedule, t)
    return jnp.sqrt(1.0 - abar) / jnp.sqrt(abar)


def activate(schedule: DDPMSchedule, z_lq: jax.Array, noise: jax.Array, weight: jax.Array,
             t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(z_t, eps_a)``: the weighted noise ``eps_a = weight * noise`` and ``z_t = add_noise(z_L, eps_a, t)``.
    ``z_lq``, ``noise`` [B, h, w, C]; ``weight`` broadcastable ([B, h, w, 1]); ``t`` scalar or [B]. float32."""
    eps_a = weight.astype(jnp.float32) * noise.astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_lq.shape[0],))
    return sched.add_noise(schedule, z_lq.astype(jnp.float32), eps_a, t), eps_a


def denoise(z_lq: jax.Array, eps_a: jax.Array, eps_hat: jax.Array, k: jax.Array) -> jax.Array:
    """``z_hat = z_L + k (eps_a - eps_hat)`` ([B, h, w, C] float32; ``k`` scalar or [B])."""
    k = jnp.asarray(k, jnp.float32)
    k = k.reshape(k.shape + (1,) * (z_lq.ndim - k.ndim)) if k.ndim else k
    return z_lq.astype(jnp.float32) + k * (eps_a.astype(jnp.float32) - eps_hat.astype(jnp.float32))
