"""LFIM (FiDeSR's latent frequency injection, :mod:`jsr.sr.lfim`) as a knob set shared by every residual-form method.

A residual-form one-step method ends with ``z = z_L - eps_hat``: FiDeSR (``eps_hat`` = UNet residual + LRRB
correction) and PiSA-SR natively, OSEDiff and CTSR through their implied residual ``eps_hat = z_L - z``. LFIM edits
that ``z`` at inference, reading ``z_L``, ``eps_hat`` and the LQ image, so each of these methods declares
:data:`LFIM_KNOBS` (one definition: the registry allows a knob name in several methods only with an identical
definition), takes :class:`ImageForLFIM` as a base (``uses_image``, pixels only while a gain is on), and ends
its ``forward`` with :func:`apply_lfim`.

Knobs (defaults: the release's ``test_fidesr.py`` except the gains):

* ``lfim_low``, ``lfim_high``: the two branch gains, **traced** (a slider or a sweep never recompiles). Default 0
  (off) for every method, so OSEDiff, CTSR and PiSA-SR outputs are unchanged unless asked; FiDeSR starts from the
  release's 0.2 / 0.3 (:class:`jsr.methods.fidesr.FiDeSR` overrides ``knob_values``). Gains 0 return the latent
  exactly (a Python 0 skips LFIM altogether; a traced 0 takes a ``lax.cond`` branch that returns ``z``).
* ``lfim_low_cut``, ``lfim_high_cut``, ``lfim_tau``, ``lfim_sharp``, ``lfim_low_gamma``, ``lfim_high_gamma``,
  ``lfim_mix``, ``lfim_radius``: the filter shapes, gates and mix, **static** (they shape the Butterworth responses
  computed at trace time; changing one recompiles the forward). ``lfim_radius="released"`` reproduces the release's
  uncentred frequency grid (for imported FiDeSR weights); ``"centred"`` (default) is the isotropic radius.

Tiling: the restorer runs ``forward`` per latent tile, so LFIM's percentile normalisations and channel gate see one
tile at a time; the release applies LFIM once to the whole (blended) latent. Images within one latent tile (the
default ``latent_tile`` covers 768 px) are identical to the whole-image edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jsr.methods.api import Knob
from jsr.sr import lfim

LFIM_KNOBS: tuple[Knob, ...] = (
    Knob("lfim_low", float, 0.0, "LFIM low-frequency gain (0 = off; FiDeSR's default 0.2)", min=0.0, max=4.0),
    Knob("lfim_high", float, 0.0, "LFIM high-frequency gain (0 = off; FiDeSR's default 0.3)", min=0.0, max=4.0),
    Knob("lfim_low_cut", float, 0.10, "LFIM Butterworth cut-off radius of the low branch and the channel gate",
         min=0.01, max=1.0, static=True),
    Knob("lfim_high_cut", float, 0.32, "LFIM Butterworth cut-off radius of the high branch", min=0.01, max=1.0,
         static=True),
    Knob("lfim_tau", float, 0.8, "LFIM channel-gate threshold on the low-pass energy ratio", min=0.0, max=1.0,
         static=True),
    Knob("lfim_sharp", float, 10.0, "LFIM channel-gate steepness", min=0.0, max=100.0, static=True),
    Knob("lfim_low_gamma", float, 1.2, "LFIM exponent of the low branch's spatial mask", min=0.1, max=8.0,
         static=True),
    Knob("lfim_high_gamma", float, 1.2, "LFIM exponent of the high branch's spatial mask", min=0.1, max=8.0,
         static=True),
    Knob("lfim_mix", float, 0.5, "LFIM weight of the low branch when both gains are on", min=0.0, max=1.0,
         static=True),
    Knob("lfim_radius", str, "centred", "LFIM frequency radius: centred (isotropic) or released (FiDeSR's "
         "uncentred grid, reproduces its outputs)", choices=("centred", "released"), static=True),
)
LFIM_KNOB_NAMES = tuple(k.name for k in LFIM_KNOBS)
# FiDeSR's release defaults for the gains (test_fidesr.py: --lf_scale 0.2, --hf_scale 0.3).
RELEASE_GAINS = {"lfim_low": 0.2, "lfim_high": 0.3}


def lfim_options(knobs: Mapping[str, Any]) -> lfim.LFIMOptions:
    """The static :class:`jsr.sr.lfim.LFIMOptions` of ``knobs`` (missing ones at their defaults; gains 0: the
    traced gains are passed separately)."""
    v = {k.name: knobs.get(k.name, k.default) for k in LFIM_KNOBS}
    return lfim.LFIMOptions(low_gain=0.0, high_gain=0.0, low_cut=float(v["lfim_low_cut"]),
                            tau=float(v["lfim_tau"]), sharp=float(v["lfim_sharp"]),
                            low_gamma=float(v["lfim_low_gamma"]), high_cut=float(v["lfim_high_cut"]),
                            high_gamma=float(v["lfim_high_gamma"]), mix=float(v["lfim_mix"]),
                            radius=str(v["lfim_radius"]))


def _concrete(v: Any) -> float | None:
    """``v`` as a Python float when it is known now (a number or a concrete array), else None (a tracer)."""
    if isinstance(v, jax.core.Tracer):
        return None
    return float(v)


def lfim_on(knobs: Mapping[str, Any]) -> bool:
    """Whether LFIM edits anything at these (concrete) knob values: a gain above 0. The LFIM methods'
    ``needs_image``: with both gains off they need no LQ pixels."""
    return any(float(knobs.get(k) or 0.0) > 0 for k in ("lfim_low", "lfim_high"))


class ImageForLFIM:
    """Mixin (before :class:`jsr.methods.api.Method` in the bases) of the residual-form methods whose LQ pixels
    serve LFIM's spatial gate only: ``uses_image``, and the pixels are needed only while a gain is on."""

    uses_image = True

    def needs_image(self, knobs: Mapping[str, Any]) -> bool:
        return lfim_on(knobs)


def apply_lfim(z: jax.Array, z_lq: jax.Array, eps_hat: jax.Array | None, x_lq: jax.Array | None,
               knobs: Mapping[str, Any]) -> jax.Array:
    """LFIM on a residual-form method's output latent, from its knob values.

    Args:
      z: the output latent ``z_L - eps_hat`` [B, h, w, C].
      z_lq: the LQ latent ``z_L``.
      eps_hat: the residual; ``None``: the implied residual ``z_L - z`` (OSEDiff, CTSR, PiSA-SR).
      x_lq: the upsampled LQ pixels [B, 8h, 8w, 3] in [-1, 1] (``uses_image``); needed only when a gain is on.
        ``None`` with traced gains: the caller checked on the host that both are off (:func:`lfim_on`).
      knobs: the method's knob values. Without ``lfim_low``/``lfim_high`` (a method calling another's forward
        with ``{}``, as CTSR does with OSEDiff's) nothing is edited.
    Returns:
      ``z`` itself when both gains are known to be <= 0 (Python numbers or concrete arrays); else the edited latent
      (with traced gains a run-time choice, bit-identical to ``z`` at gains <= 0).
    Raises:
      ValueError when a gain may be on and ``x_lq`` is missing.
    """
    lo, hi = knobs.get("lfim_low"), knobs.get("lfim_high")
    if lo is None and hi is None:
        return z
    lo = 0.0 if lo is None else lo
    hi = 0.0 if hi is None else hi
    lo_c, hi_c = _concrete(lo), _concrete(hi)
    if lo_c is not None and hi_c is not None and lo_c <= 0 and hi_c <= 0:
        return z
    if x_lq is None and (lo_c is None or hi_c is None):
        # Traced gains without the image: the restorer left the pixels out because it found the gains off
        # (``needs_image`` / :func:`lfim_on`, checked on the host); at gains <= 0 LFIM returns ``z`` exactly.
        return z
    if x_lq is None:
        raise ValueError("LFIM (lfim_low/lfim_high > 0) needs the LQ image: call forward with x_lq= (the method "
                         "declares uses_image, so the restorer and the training previews pass it)")
    z_lq = z_lq.astype(jnp.float32)
    eps = z_lq - z.astype(jnp.float32) if eps_hat is None else eps_hat
    opts = lfim_options(knobs)
    if lo_c is not None and hi_c is not None:  # known gains (eager use): the static form, only the live branches
        return lfim.lfim(z, z_lq, eps, x_lq, dataclasses.replace(opts, low_gain=lo_c, high_gain=hi_c))
    return lfim.lfim_traced(z, z_lq, eps, x_lq, lo, hi, opts)
