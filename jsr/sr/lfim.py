"""FiDeSR's LFIM (latent frequency injection module): an inference-only, training-free edit of the generator's
latent, FiDeSR's second user knob.

Inputs: ``z_L`` the LQ latent, ``eps_hat`` the residual after the LRRB, ``z = z_L - eps_hat``, and the LQ image
(the bicubic-upsampled input, [-1, 1]). From the release (``fidesr.py``, ``FiDeSR_eval.forward`` and its helpers;
defaults from ``test_fidesr.py``'s arguments):

* Butterworth filters on ``rfft2`` over (h, w) of each latent channel: ``LP = 1 / (1 + (r / r_c)^(2n))``,
  ``HP = 1 - LP``, ``n = 2``; the filtered spectrum goes back through ``irfft2`` (HP is applied as ``X HP``, not as
  ``z - LP(z)``, as released).
* Radius grid. Released (``radius="released"``): rows ``yy = k / (H - 1)`` for ``k = 0..H-1``, columns
  ``xx = k / (W // 2)`` for the ``W // 2 + 1`` rfft bins, ``r = sqrt(yy^2 + xx^2) / max(max r, 1)`` (= / sqrt 2).
  This measures rows on an *uncentred* axis, so negative vertical frequencies (rows above H/2) count as high, and
  the positive vertical frequencies run at about half the horizontal scale (``yy ~ f_y``, ``xx = 2 f_x`` in
  cycles/sample), an anisotropic filter. Centred (``radius="centred"``, the default): ``r = sqrt((2|f_y|)^2 +
  (2 f_x)^2) / sqrt 2`` with ``f = fftfreq`` (signed, cycles/sample), i.e. the release's horizontal axis applied
  to both axes; isotropic, symmetric in ``+-f_y``, ``r = 1`` at the (Nyquist, Nyquist) corner. Use
  ``"released"`` to reproduce the release's outputs (imported FiDeSR weights were tuned with it).
* Channel gate (one value per sample and latent channel): ``M_ch = sigmoid(sharp (clip(||LP(z_L)|| / ||z_L||, 0,
  1) - tau))``, L2 norms over (h, w), each ``sqrt(max(sum x^2, 1e-12))``; the LP uses the *low* cut. The high
  branch reuses this low-cut gate (as released).
* Spatial gate: ``M_sp = clip(bilinear(D(x_LQ01)), 0, 1)`` with ``D`` = :func:`jsr.sr.daw.detail_map` of the LQ
  image mapped to [0, 1] (the release's inference does ``x * 0.5 + 0.5``), resized to the latent grid as
  ``F.interpolate(bilinear, align_corners=False)`` (no anti-aliasing).
* Residual map: ``R = pnorm(0.8 mean_c|eps_hat| + 0.2 std_c|eps_hat|)`` (``std`` ddof 1; pnorm = 5-95 % percentile
  normalisation, clipped, eps 1e-6).
* Low branch: ``z_lo = z + g_lo pnorm((1 - M_sp) R)^gamma_lo M_ch LP_lo(z)``.
* High branch: ``z_hi = z + g_hi M_sp^gamma_hi (1 - M_ch) (HP_hi(z) - HP_hi(z_L))``.
* Output: ``m z_lo + (1 - m) z_hi`` (``m`` clipped to [0, 1]) when both gains are > 0, else the active branch,
  else ``z`` itself (the very same array). A gain <= 0 disables its branch, as released (``if lf_scale > 0``).

Release defaults (``test_fidesr.py``): low cut 0.10, tau 0.8, sharp 10, low gamma 1.2, low gain 0.2, high cut 0.32,
high gamma 1.2, high gain 0.3, mix 0.5, orders 2. (``scripts/test/test_fidesr.sh`` runs with both gains 0.2; the
``getattr`` fall-backs inside ``fidesr.py``, cut 0.30, tau 0.5, sharp 8, gains 0.1, are never used by the script.)
Everything is computed in float32 and the result cast to ``z``'s dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jsr.sr.daw import detail_map, percentile_normalize, resize_bilinear

Radius = Literal["centred", "released"]
_NORM_FLOOR = 1e-12  # release: ``sum(x^2).clamp_min(1e-12).sqrt()``


@dataclasses.dataclass(frozen=True)
class LFIMOptions:
    """LFIM settings (defaults: the release's ``test_fidesr.py``). Hashable, so it can be a static jit argument.

    Attributes:
      low_gain: strength of the low-frequency branch (``--lf_scale``); <= 0 disables it.
      low_cut: Butterworth cut-off radius of the low branch and of the channel gate (``--lf_rc``), in [0, 1].
      low_order: Butterworth order of the low branch and gate (``--lf_order``).
      tau: channel-gate threshold on the low-pass energy ratio (``--lf_tau``).
      sharp: channel-gate steepness (``--lf_sharp``).
      low_gamma: exponent of the low branch's spatial mask (``--lf_dmap_gamma``).
      high_gain: strength of the high-frequency branch (``--hf_scale``); <= 0 disables it.
      high_cut: Butterworth cut-off radius of the high branch (``--hf_rc``).
      high_order: Butterworth order of the high branch (``--hf_order``).
      high_gamma: exponent of the high branch's spatial mask (``--hf_dmap_gamma``).
      mix: weight of the low branch when both are on (``--lf_hf_merge_ratio``), clipped to [0, 1].
      radius: ``"centred"`` (correct, default) or ``"released"`` (the release's uncentred grid).
    """

    low_gain: float = 0.2
    low_cut: float = 0.10
    low_order: int = 2
    tau: float = 0.8
    sharp: float = 10.0
    low_gamma: float = 1.2
    high_gain: float = 0.3
    high_cut: float = 0.32
    high_order: int = 2
    high_gamma: float = 1.2
    mix: float = 0.5
    radius: Radius = "centred"

    def __post_init__(self) -> None:
        if self.radius not in ("centred", "released"):
            raise ValueError(f"LFIMOptions.radius: want 'centred' or 'released', got {self.radius!r}")


def radius_grid(h: int, w: int, radius: Radius = "centred") -> np.ndarray:
    """Normalised frequency radius of each ``rfft2`` bin of an [h, w] signal: [h, w // 2 + 1] float32 in [0, 1].

    ``"centred"``: ``sqrt((2|fftfreq(h)|)^2 + (2 rfftfreq(w))^2) / sqrt 2``. ``"released"``: the release's
    ``sqrt((k / (h-1))^2 + (l / (w//2))^2) / max(max r, 1)`` over row index ``k`` and rfft column ``l``.
    """
    if radius == "centred":
        fy = 2.0 * np.abs(np.fft.fftfreq(h))[:, None]
        fx = 2.0 * np.fft.rfftfreq(w)[None, :]
        r = np.sqrt(fy * fy + fx * fx) / np.sqrt(2.0)
    elif radius == "released":
        yy = np.arange(h, dtype=np.float64)[:, None] / max(h - 1, 1)
        xx = np.arange(w // 2 + 1, dtype=np.float64)[None, :] / max(w // 2, 1)
        r = np.sqrt(yy * yy + xx * xx)
        r = r / max(r.max(), 1.0)
    else:
        raise ValueError(f"radius: want 'centred' or 'released', got {radius!r}")
    return r.astype(np.float32)


def butterworth_lowpass_response(h: int, w: int, cut: float, order: int = 2,
                                 radius: Radius = "centred") -> np.ndarray:
    """``1 / (1 + (r / cut)^(2 order))`` on the :func:`radius_grid`, [h, w // 2 + 1] float32."""
    r = radius_grid(h, w, radius).astype(np.float64)
    return (1.0 / (1.0 + (r / cut) ** (2 * order))).astype(np.float32)


def _filter(z: jax.Array, response: np.ndarray) -> jax.Array:
    h, w = z.shape[1], z.shape[2]
    spec = jnp.fft.rfft2(z.astype(jnp.float32), axes=(1, 2))
    spec = spec * jnp.asarray(response)[None, :, :, None]
    return jnp.fft.irfft2(spec, s=(h, w), axes=(1, 2)).astype(jnp.float32)


def butterworth_lowpass(z: jax.Array, cut: float, order: int = 2, radius: Radius = "centred") -> jax.Array:
    """Butterworth low-pass of each channel of ``z`` [B, h, w, C] (NHWC) through ``rfft2``/``irfft2`` over
    (h, w): [B, h, w, C] float32."""
    return _filter(z, butterworth_lowpass_response(z.shape[1], z.shape[2], cut, order, radius))


def butterworth_highpass(z: jax.Array, cut: float, order: int = 2, radius: Radius = "centred") -> jax.Array:
    """Butterworth high-pass (spectrum times ``1 - LP``) of each channel of ``z`` [B, h, w, C]: float32."""
    return _filter(z, 1.0 - butterworth_lowpass_response(z.shape[1], z.shape[2], cut, order, radius))


def channel_gate(z_lq: jax.Array, cut: float, order: int = 2, tau: float = 0.8, sharp: float = 10.0,
                 radius: Radius = "centred") -> jax.Array:
    """``sigmoid(sharp (clip(||LP(z_L)|| / ||z_L||, 0, 1) - tau))`` per sample and channel: [B, 1, 1, C]
    float32 in (0, 1); L2 norms over (h, w), floored at ``sqrt(1e-12)`` as released. ``z_lq`` [B, h, w, C]."""
    x = z_lq.astype(jnp.float32)
    lp = butterworth_lowpass(x, cut, order, radius)
    num = jnp.sqrt(jnp.maximum(jnp.sum(lp * lp, axis=(1, 2), keepdims=True), _NORM_FLOOR))
    den = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=(1, 2), keepdims=True), _NORM_FLOOR))
    ratio = jnp.clip(num / den, 0.0, 1.0)
    return jax.nn.sigmoid(sharp * (ratio - tau))


def spatial_gate(x_lq: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """``clip(bilinear(D(x_LQ * 0.5 + 0.5)), 0, 1)``: [B, h, w, 1] float32 in [0, 1].

    ``x_lq`` [B, H, W, 3] in **[-1, 1]** (the upsampled LQ the generator encodes); the release maps it to [0, 1]
    before :func:`jsr.sr.daw.detail_map` at inference. ``latent_hw`` = (h, w) of the latent grid."""
    d = detail_map(x_lq.astype(jnp.float32) * 0.5 + 0.5)
    return jnp.clip(resize_bilinear(d, latent_hw), 0.0, 1.0)


def residual_map(eps_hat: jax.Array) -> jax.Array:
    """``pnorm(0.8 mean_c|eps_hat| + 0.2 std_c|eps_hat|)`` (``std`` ddof 1): [B, h, w, C] -> [B, h, w, 1] float32
    in [0, 1]."""
    a = jnp.abs(eps_hat.astype(jnp.float32))
    m = 0.8 * jnp.mean(a, axis=-1, keepdims=True) + 0.2 * jnp.std(a, axis=-1, keepdims=True, ddof=1)
    return percentile_normalize(m)


def _pow(x: jax.Array, gamma: float) -> jax.Array:
    return x if gamma == 1.0 else jnp.power(x, gamma)  # release skips the power at gamma 1


def _gates(z: jax.Array, z_lq: jax.Array, x_lq: jax.Array, o: LFIMOptions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(z float32, M_sp [B, h, w, 1], M_ch [B, 1, 1, C])``."""
    hw = (z.shape[1], z.shape[2])
    m_sp = spatial_gate(x_lq, hw)
    m_ch = channel_gate(z_lq, o.low_cut, o.low_order, o.tau, o.sharp, o.radius)
    return z.astype(jnp.float32), m_sp, m_ch


def _low_terms(zf: jax.Array, m_sp: jax.Array, m_ch: jax.Array, eps_hat: jax.Array,
               o: LFIMOptions) -> tuple[jax.Array, jax.Array]:
    """``(mask, LP_lo(z))``: the low branch is ``z + g_lo * mask * LP_lo(z)``."""
    mask = _pow(percentile_normalize((1.0 - m_sp) * residual_map(eps_hat)), o.low_gamma) * m_ch
    return mask, butterworth_lowpass(zf, o.low_cut, o.low_order, o.radius)


def _high_terms(zf: jax.Array, z_lq: jax.Array, m_sp: jax.Array, m_ch: jax.Array,
                o: LFIMOptions) -> tuple[jax.Array, jax.Array]:
    """``(mask, HP_hi(z) - HP_hi(z_L))``: the high branch is ``z + g_hi * mask * delta``."""
    delta = (butterworth_highpass(zf, o.high_cut, o.high_order, o.radius)
             - butterworth_highpass(z_lq, o.high_cut, o.high_order, o.radius))
    return _pow(m_sp, o.high_gamma) * (1.0 - m_ch), delta


def _mix(o: LFIMOptions) -> float:
    return min(max(float(o.mix), 0.0), 1.0)


def lfim(z: jax.Array, z_lq: jax.Array, eps_hat: jax.Array, x_lq: jax.Array,
         options: LFIMOptions = LFIMOptions()) -> jax.Array:
    """Apply LFIM to the generator's latent (inference only).

    Args:
      z: the generator's latent ``z_L - eps_hat`` [B, h, w, C], NHWC, scaled SD latent space.
      z_lq: the LQ latent ``z_L`` [B, h, w, C].
      eps_hat: the residual after the LRRB, [B, h, w, C].
      x_lq: the LQ image the latent was encoded from (upsampled to the output size) [B, H, W, 3] in [-1, 1].
      options: :class:`LFIMOptions` (static: the gains decide which branches exist).
    Returns:
      The edited latent, ``z``'s shape and dtype. With both gains <= 0 it returns ``z`` itself, untouched.
    """
    o = options
    low_on, high_on = o.low_gain > 0, o.high_gain > 0
    if not (low_on or high_on):
        return z
    zf, m_sp, m_ch = _gates(z, z_lq, x_lq, o)
    z_lo = z_hi = zf
    if low_on:
        mask, lp = _low_terms(zf, m_sp, m_ch, eps_hat, o)
        z_lo = zf + o.low_gain * mask * lp
    if high_on:
        mask, delta = _high_terms(zf, z_lq, m_sp, m_ch, o)
        z_hi = zf + o.high_gain * mask * delta
    if low_on and high_on:
        m = _mix(o)
        out = m * z_lo + (1.0 - m) * z_hi
    else:
        out = z_lo if low_on else z_hi
    return out.astype(z.dtype)


def lfim_traced(z: jax.Array, z_lq: jax.Array, eps_hat: jax.Array, x_lq: jax.Array, low_gain: jax.Array | float,
                high_gain: jax.Array | float, options: LFIMOptions = LFIMOptions()) -> jax.Array:
    """:func:`lfim` with the two gains as (traced) scalars: one compiled program serves every gain, so a slider or a
    sweep over the gains never recompiles. ``options``' own gains are ignored; its other fields stay static.

    The branch selection of :func:`lfim` (a gain <= 0 disables its branch; both on: the ``mix``) is made at run
    time with ``jnp.where``; when both gains are <= 0 a ``lax.cond`` returns ``z`` itself (same values, bit for
    bit) without computing the edit.
    """
    o = options
    lo = jnp.asarray(low_gain, jnp.float32)
    hi = jnp.asarray(high_gain, jnp.float32)
    low_on, high_on = lo > 0, hi > 0

    def edit(z):
        zf, m_sp, m_ch = _gates(z, z_lq, x_lq, o)
        mask, lp = _low_terms(zf, m_sp, m_ch, eps_hat, o)
        z_lo = zf + lo * mask * lp
        mask, delta = _high_terms(zf, z_lq, m_sp, m_ch, o)
        z_hi = zf + hi * mask * delta
        m = _mix(o)
        out = jnp.where(low_on & high_on, m * z_lo + (1.0 - m) * z_hi, jnp.where(low_on, z_lo, z_hi))
        return out.astype(z.dtype)

    return jax.lax.cond(low_on | high_on, edit, lambda z: z, z)
