"""FiDeSR's detail-aware weighting (DAW): a per-pixel loss weight ``w`` that favours detailed regions the
generator still gets wrong.

Formulas (from the release, ``train_fidesr.py``: ``build_D``, ``build_E`` and the DAW block of the training loop;
defaults from ``scripts/train/train_fidesr.sh`` / ``src/my_utils/training_utils.py``). Maps are NHWC with one
channel, [B, H, W, 1]; ``pnorm`` is the per-sample 5-95 % percentile normalisation
``clip((x - q05) / (q95 - q05 + 1e-6), 0, 1)`` with ``torch.quantile``'s linear interpolation (= ``jnp.quantile``
``method="linear"``); 3x3 filters use *replicate* padding (``F.pad(..., mode="replicate")``) and are
cross-correlations as ``F.conv2d``.

* Detail map ``D(x)``: ``g = 0.299 R + 0.587 G + 0.114 B`` (or the single channel); ``D = pnorm((|Sobel g| +
  |Laplacian g| + var3(g)) / 3)`` then a 3x3 box blur, where ``|Sobel g| = sqrt(gx^2 + gy^2)`` (kernels
  ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` and its transpose), Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]``, and
  ``var3(g) = box3((g - box3(g))^2)``. Values in [0, 1].
  **Input range**: the release's training calls ``build_D`` on the HQ target *as it is*, in [-1, 1]; its
  inference (LFIM's spatial gate) first maps [-1, 1] to [0, 1]. The three terms scale differently (gradients
  linearly, the variance quadratically), so the range matters: :func:`detail_map` takes the image unchanged and
  the caller picks (DAW: [-1, 1]; :mod:`jsr.sr.lfim`: [0, 1], as the release).
* Error map ``E``: ``d = |x_SR - x_HQ|`` (float32), ``E_pix = 0.8 mean_c d + 0.2 std_c d`` (``std`` unbiased,
  ddof 1, as ``torch.std``); ``E = pnorm((1 - p) E_pix + p L)`` with ``L`` the LPIPS-VGG spatial map
  (``lpips.LPIPS(net="vgg", spatial=True)`` on the [-1, 1] images; :func:`jsr.metrics.lpips.lpips_spatial`),
  ``p = 0.5``.
* Soft clip: ``sc(W) = wmax tanh(Wb / (mean_hw(Wb) + 1e-6) / wmax)`` with ``Wb = box3(W)``, ``wmax = 2``.
  (DESIGN.md writes ``blur(W) / mean(W)``; the release divides by the mean of the *blurred* map; we follow it.)
* Weight: ``W_hf = D(x_HQ) E``; ``w = 1 + a_hf sc(W_hf) [+ a_lf sc(W_lf)]``, ``w <- w / (mean_hw(w) + 1e-8)``.
  ``a = ramp * alpha`` with ``ramp = min(step - warmup, ramp_steps) / ramp_steps`` once ``step >= warmup``
  (defaults ``alpha_hf 0.6``, ``warmup 2000``, ``ramp_steps 1000``). Before ``warmup`` the release uses no
  weight at all, which equals ``w = 1`` exactly. The optional low-frequency term (release ``alpha_daw_lf``,
  default 0, off in the released run) is ``W_lf = clip(1 - box3^k(D), 0, 1) E``, ``k = daw_lf_smooth = 1``.
* Use: ``w`` multiplies the per-pixel squared error of the L2 loss (``mean(w (x_SR - x_HQ)^2)``), the LPIPS
  spatial map (``mean(w L)``), and, resized to the latent grid by :func:`resize_to_latent`, CSD's per-element
  ``(z - sg(z - g))^2`` before its mean.

Gradients: the release computes ``D`` and ``E`` under ``torch.no_grad()``, so ``w`` carries no gradient; here
every public map and the weight are wrapped in ``jax.lax.stop_gradient``.

All functions are pure ``jnp``, jit-able, and take the training step as a Python int or a traced scalar.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

GREY = (0.299, 0.587, 0.114)
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
BOX3 = np.full((3, 3), 1.0 / 9.0, np.float32)
PNORM_EPS = 1e-6  # release: ``q95 - q05 + 1e-6``
SOFTCLIP_EPS = 1e-6  # release: ``Wb.mean() + 1e-6``
WNORM_EPS = 1e-8  # release: ``w / (w_mean + 1e-8)``


@dataclasses.dataclass(frozen=True)
class DAWOptions:
    """DAW hyper-parameters (defaults: the released training run).

    Attributes:
      alpha_hf: strength of the detail (high-frequency) term (``--alpha_daw_hf``).
      alpha_lf: strength of the optional low-frequency term (``--alpha_daw_lf``, 0 = off as released).
      warmup: steps before DAW starts (``--daw_warmup_offset``).
      ramp: steps of the linear ramp of the strengths from 0 (``--daw_ramp_steps``; 0 = full at once).
      p_perc: weight of the LPIPS map in the error map (``--daw_wperc``).
      wmax: soft-clip level (``--wmax_daw``).
      lf_smooth: box blurs of ``D`` before the LF inversion (``--daw_lf_smooth``).
    """

    alpha_hf: float = 0.6
    alpha_lf: float = 0.0
    warmup: int = 2000
    ramp: int = 1000
    p_perc: float = 0.5
    wmax: float = 2.0
    lf_smooth: int = 1


def conv3x3_replicate(x: jax.Array, kernel: np.ndarray) -> jax.Array:
    """3x3 cross-correlation of every channel of ``x`` [B, H, W, C] with ``kernel`` [3, 3], replicate padding
    (PyTorch ``F.conv2d(F.pad(x, (1,1,1,1), "replicate"), k)``). Output [B, H, W, C], same dtype."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]
    out = None
    for i in range(3):
        for j in range(3):
            k = float(kernel[i, j])
            if k == 0.0:
                continue
            term = k * xp[:, i:i + h, j:j + w]
            out = term if out is None else out + term
    return out


def box3(x: jax.Array) -> jax.Array:
    """3x3 mean filter with replicate padding, [B, H, W, C] -> [B, H, W, C]."""
    return conv3x3_replicate(x, BOX3)


def percentile_normalize(x: jax.Array, lo: float = 0.05, hi: float = 0.95, eps: float = PNORM_EPS) -> jax.Array:
    """Per-sample ``clip((x - q_lo) / (q_hi - q_lo + eps), 0, 1)``; quantiles over all non-batch elements with
    linear interpolation (``torch.quantile``'s default). ``x`` [B, ...] -> same shape, float32."""
    xf = x.astype(jnp.float32)
    flat = xf.reshape(xf.shape[0], -1)
    q = jnp.quantile(flat, jnp.asarray([lo, hi], jnp.float32), axis=1, method="linear")  # [2, B]
    shape = (xf.shape[0],) + (1,) * (xf.ndim - 1)
    qlo, qhi = q[0].reshape(shape), q[1].reshape(shape)
    return jnp.clip((xf - qlo) / (qhi - qlo + eps), 0.0, 1.0)


def grey(img: jax.Array) -> jax.Array:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` of [B, H, W, 3] (a [B, H, W, 1] image passes through), float32,
    [B, H, W, 1]; values keep the input's range."""
    x = img.astype(jnp.float32)
    if x.shape[-1] == 1:
        return x
    if x.shape[-1] != 3:
        raise ValueError(f"grey: want [B, H, W, 3] or [B, H, W, 1], got {img.shape}")
    return GREY[0] * x[..., 0:1] + GREY[1] * x[..., 1:2] + GREY[2] * x[..., 2:3]


def detail_map(img: jax.Array) -> jax.Array:
    """FiDeSR's detail map ``D``: [B, H, W, 3|1] -> [B, H, W, 1] float32 in [0, 1], no gradient.

    ``box3(pnorm((|Sobel| + |Laplacian| + var3) / 3))`` of the grey image. The image is used *as given*: pass
    [-1, 1] images for DAW (the release's training does) and [0, 1] for LFIM's spatial gate (its inference
    does); see the module docstring.
    """
    g = grey(jax.lax.stop_gradient(img))
    gx = conv3x3_replicate(g, SOBEL_X)
    gy = conv3x3_replicate(g, SOBEL_Y)
    sobel = jnp.sqrt(gx * gx + gy * gy)
    lap = jnp.abs(conv3x3_replicate(g, LAPLACIAN))
    var = box3(jnp.square(g - box3(g)))
    d = percentile_normalize((sobel + lap + var) / 3.0)
    return box3(d)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, **no** anti-aliasing: an 8x reduction averages the two centre pixels of each 8-pixel
    span, as the release's CSD weight resize does). Identity when the size already matches."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], size[0], size[1], x.shape[3]), method="bilinear", antialias=False)


def error_map(x_sr: jax.Array, x_hq: jax.Array, lpips_map: jax.Array, p: float = 0.5) -> jax.Array:
    """FiDeSR's error map ``E``: [B, H, W, 1] float32 in [0, 1], no gradient.

    Args:
      x_sr, x_hq: [B, H, W, 3] images in [-1, 1] (the release's training range; the pixel term is in those units).
      lpips_map: LPIPS-VGG spatial map of the same pair, [B, H, W, 1] or [B, H, W] (e.g.
        ``jsr.metrics.lpips.lpips_spatial``); another spatial size is resized bilinearly as the release does.
      p: the LPIPS map's weight (release ``--daw_wperc`` 0.5).
    Returns:
      ``pnorm((1 - p)(0.8 mean_c|d| + 0.2 std_c|d|) + p L)``, ``std`` with ddof 1 (``torch.std``).
    """
    d = jnp.abs(jax.lax.stop_gradient(x_sr).astype(jnp.float32) - jax.lax.stop_gradient(x_hq).astype(jnp.float32))
    e_pix = 0.8 * jnp.mean(d, axis=-1, keepdims=True) + 0.2 * jnp.std(d, axis=-1, keepdims=True, ddof=1)
    lp = jax.lax.stop_gradient(lpips_map).astype(jnp.float32)
    if lp.ndim == 3:
        lp = lp[..., None]
    lp = resize_bilinear(lp, x_hq.shape[1:3])
    return percentile_normalize((1.0 - p) * e_pix + p * lp)


def soft_clip(w: jax.Array, wmax: float = 2.0) -> jax.Array:
    """``wmax tanh(Wb / (mean_hw(Wb) + 1e-6) / wmax)``, ``Wb = box3(W)``: [B, H, W, 1] -> same, in [0, wmax)
    for non-negative ``W`` (the release's ``_soft_clip_and_norm``)."""
    wb = box3(w)
    wb = wb / (jnp.mean(wb, axis=(1, 2), keepdims=True) + SOFTCLIP_EPS)
    return jnp.tanh(wb / wmax) * wmax


def daw_ramp(step: jax.Array | int, warmup: int = 2000, ramp: int = 1000) -> jax.Array:
    """The ramp factor in [0, 1] (float32 scalar): 0 before ``warmup``, ``min(step - warmup, ramp) / ramp``
    after (1 at once when ``ramp <= 0``). ``step`` may be traced."""
    s = jnp.asarray(step, jnp.float32)
    if ramp <= 0:
        return jnp.where(s >= warmup, 1.0, 0.0).astype(jnp.float32)
    return (jnp.clip(s - warmup, 0.0, float(ramp)) / float(ramp)).astype(jnp.float32)


def daw_active(step: jax.Array | int, warmup: int = 2000) -> jax.Array:
    """Whether DAW is on at ``step`` (``step >= warmup``), a bool scalar; ``step`` may be traced."""
    return jnp.asarray(step) >= warmup


def daw_weight(x_sr: jax.Array, x_hq: jax.Array, lpips_map: jax.Array, step: jax.Array | int,
               options: DAWOptions = DAWOptions()) -> jax.Array:
    """FiDeSR's per-pixel loss weight ``w``: [B, H, W, 1] float32, mean 1 per sample, no gradient.

    Args:
      x_sr: the generator's output [B, H, W, 3] in [-1, 1] (its gradient is stopped here).
      x_hq: the HQ target [B, H, W, 3] in [-1, 1]; ``D`` is computed from it in that range, as the release.
      lpips_map: LPIPS-VGG spatial map of ``(x_sr, x_hq)``, [B, H, W(, 1)] (see :func:`error_map`).
      step: the training step (optimizer updates so far; Python int or traced scalar).
      options: :class:`DAWOptions`.
    Returns:
      ``w = (1 + a_hf sc(D E) + a_lf sc(W_lf)) / (mean_hw + 1e-8)`` once ``step >= warmup``, exactly 1 before.
      Multiply the per-pixel L2 and the LPIPS spatial map with it; :func:`resize_to_latent` for CSD.
    """
    o = options
    r = daw_ramp(step, o.warmup, o.ramp)
    d = detail_map(x_hq)
    e = error_map(x_sr, x_hq, lpips_map, o.p_perc)
    w = 1.0 + (r * o.alpha_hf) * soft_clip(d * e, o.wmax)
    if o.alpha_lf != 0.0:  # static: the released run has no LF term
        dl = d
        for _ in range(o.lf_smooth):
            dl = box3(dl)
        w = w + (r * o.alpha_lf) * soft_clip(jnp.clip(1.0 - dl, 0.0, 1.0) * e, o.wmax)
    w = w / (jnp.mean(w, axis=(1, 2), keepdims=True) + WNORM_EPS)
    w = jnp.where(daw_active(step, o.warmup), w, jnp.ones_like(w))
    return jax.lax.stop_gradient(w)


def resize_to_latent(w: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """The pixel weight [B, H, W, 1] on the latent grid [B, h, w, 1] for CSD, bilinear without anti-aliasing as
    the release's ``F.interpolate(weight_map, size=latents.shape[-2:], mode="bilinear", align_corners=False)``
    (so the latent weight is not renormalised: its mean is only close to 1). No gradient."""
    return jax.lax.stop_gradient(resize_bilinear(w, latent_hw))
