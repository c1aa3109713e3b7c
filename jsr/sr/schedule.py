"""The base model's DDPM noise schedule: ``abar_t``, forward noising and the epsilon / x0 / v conversions.

Built from a diffusers ``scheduler/scheduler_config.json`` (any scheduler class: only the training-schedule keys
``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas`` and
``prediction_type`` matter). SD 2.1-base: ``scaled_linear`` betas ``linspace(sqrt(0.00085), sqrt(0.012), 1000)^2``,
``epsilon`` prediction; SD 2.1-768 is the same schedule with ``v_prediction``.

Timesteps may be **floats** (CTSR's control maps a continuous ``t`` onto the UNet timestep): ``abar`` at a
non-integer ``t`` is interpolated *linearly in abar* between the two neighbouring integer steps,
``abar(t) = abar[i] + (t - i) (abar[i+1] - abar[i])`` with ``i = floor(t)``, and ``t`` is clamped to
``[0, num_train_timesteps - 1]``. Integer timesteps read the table exactly (the interpolation weight is 0), so
every integer-timestep formula here equals diffusers' ``DDPMScheduler`` one. The table is computed in float64
and stored as float32.

All functions broadcast a per-sample timestep ``t`` of shape ``[B]`` (or a scalar) against NHWC latents
``[B, H, W, C]``; latents are in the *scaled* SD latent space (``scaling_factor`` already applied).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, np.float64)
        if betas.shape != (n,):
            raise ValueError(f"scheduler config: trained_betas has {betas.shape[0]} entries, "
                             f"num_train_timesteps is {n}")
        return betas
    kind = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(b0, b1, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule with betas capped at 0.999, as diffusers' betas_for_alpha_bar.
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float64)
    raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported "
                     "(want linear, scaled_linear, squaredcos_cap_v2 or trained_betas)")


@struct.dataclass
class DDPMSchedule:
    """Cumulative alphas of a DDPM training schedule (a pytree: the table is data, the rest static).

    Attributes:
      alphas_cumprod: [T] float32, ``abar_t = prod_{s<=t} (1 - beta_s)``.
      prediction_type: what the UNet predicts, ``"epsilon"`` or ``"v_prediction"``.
    """

    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDPMSchedule":
        """Schedule from a diffusers scheduler config dict (unknown keys are ignored)."""
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("scheduler config: rescale_betas_zero_snr=True is not supported")
        pred = config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config: prediction_type {pred!r} is not supported (want {PREDICTION_TYPES})")
        abar = np.cumprod(1.0 - _betas(config))
        return cls(alphas_cumprod=jnp.asarray(abar, jnp.float32), prediction_type=pred)


def load_schedule(model_dir: str | os.PathLike) -> DDPMSchedule:
    """Read ``<model_dir>/scheduler/scheduler_config.json`` (or ``model_dir`` itself if it is the scheduler
    folder or the JSON file)."""
    p = Path(model_dir)
    for cand in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return DDPMSchedule.from_config(json.loads(cand.read_text()))
    raise FileNotFoundError(f"{model_dir}: no scheduler/scheduler_config.json")


def _expand(v: jax.Array, like: jax.Array) -> jax.Array:
    """[B] or scalar -> broadcastable against ``like`` [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def alpha_bar(schedule: DDPMSchedule, t: jax.Array) -> jax.Array:
    """``abar_t`` for integer or float timesteps ``t`` (any shape), float32; linear interpolation between
    integer steps, ``t`` clamped to ``[0, T-1]``."""
    table = schedule.alphas_cumprod
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, table.shape[0] - 1)
    lo = jnp.floor(t)
    w = t - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, table.shape[0] - 1)
    return table[lo] * (1.0 - w) + table[hi] * w


def _coeffs(schedule: DDPMSchedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    abar = _expand(alpha_bar(schedule, t), like)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``x0``, ``noise`` [B, ...], ``t`` [B] or scalar."""
    a, s = _coeffs(schedule, t, x0)
    return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)


def x0_from_eps(schedule: DDPMSchedule, z_t: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (float32)."""
    a, s = _coeffs(schedule, t, z_t)
    return (z_t.astype(jnp.float32) - s * eps.astype(jnp.float32)) / a


def eps_from_x0(schedule: DDPMSchedule, z_t: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """``eps = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` (float32)."""
    a, s = _coeffs(schedule, t, z_t)
    return (z_t.astype(jnp.float32) - a * x0.astype(jnp.float32)) / s


def x0_from_v(schedule: DDPMSchedule, z_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """``x0 = sqrt(abar_t) z_t - sqrt(1 - abar_t) v`` (v-parameterisation, Salimans & Ho 2022)."""
    a, s = _coeffs(schedule, t, z_t)
    return a * z_t.astype(jnp.float32) - s * v.astype(jnp.float32)


def eps_from_v(schedule: DDPMSchedule, z_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """``eps = sqrt(1 - abar_t) z_t + sqrt(abar_t) v``."""
    a, s = _coeffs(schedule, t, z_t)
    return s * z_t.astype(jnp.float32) + a * v.astype(jnp.float32)


def velocity(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v target ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
    a, s = _coeffs(schedule, t, x0)
    return a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)


def eps_from_output(schedule: DDPMSchedule, z_t: jax.Array, out: jax.Array, t: jax.Array) -> jax.Array:
    """The UNet's raw output as an epsilon prediction (identity for ``epsilon`` models)."""
    if schedule.prediction_type == "epsilon":
        return out.astype(jnp.float32)
    return eps_from_v(schedule, z_t, out, t)


def x0_from_output(schedule: DDPMSchedule, z_t: jax.Array, out: jax.Array, t: jax.Array) -> jax.Array:
    """The UNet's raw output as an x0 prediction."""
    if schedule.prediction_type == "epsilon":
        return x0_from_eps(schedule, z_t, out, t)
    return x0_from_v(schedule, z_t, out, t)


def training_target(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet regresses in its own diffusion loss: ``noise`` (epsilon models) or ``v``."""
    if schedule.prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    return velocity(schedule, x0, noise, t)
