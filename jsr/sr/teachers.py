"""Score networks in the SD latent space: the frozen base + a LoRA, or an adapter over a pixel-space restorer.

A *teacher* is anything with ``eps(z_t, t, c) -> eps`` (``z_t`` [B, h, w, 4] NHWC scaled latents, ``t`` [B]
float32 UNet timesteps, ``c`` [B, L, D] prompt embeddings; returns float32 [B, h, w, 4] epsilon predictions).
``jsr.sr.losses`` takes the bound ``eps`` methods as callables. The same object also serves as the real score
(base, no LoRA), the VSD fake score (base + fake LoRA), CTSR's student-as-score, its teachers and stage 2's
frozen stage-1 model.

One base, many networks: a :class:`UNetTeacher` holds *references* to the frozen base parameters and its own
:class:`jsr.models.lora.LoRA`; build teachers inside the jitted function from the traced base argument, so every
network reads the same device buffers (the base appears once among the jitted function's arguments).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jsr.models import lora as lora_lib
from jsr.sr import schedule as sched
from jsr.sr.schedule import DDPMSchedule


@struct.dataclass
class UNetTeacher:
    """The shared frozen UNet base plus one LoRA (``None``: the plain base, e.g. the VSD/CSD real score).

    Attributes:
      params: the base UNet parameters (shared; never copied).
      lora: a :class:`jsr.models.lora.LoRA` (stack several with ``lora.stack`` first) or ``None``.
      schedule: the base's DDPM schedule (converts v-prediction outputs to epsilon).
      unet: the ``UNet2DConditionModel`` module (static).
    """

    params: Any
    lora: lora_lib.LoRA | None
    schedule: DDPMSchedule
    unet: nn.Module = struct.field(pytree_node=False)

    def output(self, z_t: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """The UNet's raw prediction (epsilon or v, per ``schedule.prediction_type``), float32 [B, h, w, 4]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        out = self.unet.apply(lora_lib.variables(self.params, self.lora), z_t, t, c)
        return out.astype(jnp.float32)

    def eps(self, z_t: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """Epsilon prediction, float32 [B, h, w, 4]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        return sched.eps_from_output(self.schedule, z_t, self.output(z_t, t, c), t)


@struct.dataclass
class RestoredLatentTeacher:
    """A pixel-space restorer seen as a latent-space denoiser whose clean estimate is its restoration.

    For a restorer ``R`` (ResShift/SinSR-like: LQ image -> HQ image) the teacher's clean latent is
    ``z_R = s * E(R(x_LQ))`` whatever the noise level, so its epsilon at ``(z_t, t)`` is the one that maps
    ``z_t`` to ``z_R``: ``eps = (z_t - sqrt(abar_t) z_R) / sqrt(1 - abar_t)``. When ``z_t = add_noise(z, n, t)``
    this is exactly "re-encode the restoration, add the same noise ``n``, and read off the noise":
    ``eps = n + sqrt(abar_t / (1 - abar_t)) (z - z_R)``. It ignores ``c``. Build with :func:`restorer_teacher`.

    Attributes:
      z_restored: [B, h, w, 4] scaled latent of the restored batch (a constant: no gradient flows into it).
      schedule: the base's DDPM schedule.
    """

    z_restored: jax.Array
    schedule: DDPMSchedule

    def eps(self, z_t: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:  # noqa: ARG002 - interface
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],))
        z_r = self.z_restored
        if z_t.shape[0] != z_r.shape[0]:  # a CFG-style doubled batch: the restoration repeats
            z_r = jnp.tile(z_r, (z_t.shape[0] // z_r.shape[0], 1, 1, 1))
        return sched.eps_from_x0(self.schedule, z_t, z_r, t)


def restorer_teacher(restore: Callable[[jax.Array], jax.Array], *, vae: nn.Module, vae_params: Any,
                     scaling_factor: float, schedule: DDPMSchedule, x_lq: jax.Array | None = None,
                     z_lq: jax.Array | None = None) -> RestoredLatentTeacher:
    """Wrap a pixel-space restorer as a teacher: (decode), restore, re-encode.

    Args:
      restore: ``x_lq -> x_hq``, NHWC images in [-1, 1] (output clipped to [-1, 1]); any pure JAX function,
        e.g. a ported ResShift, or a closure over precomputed teacher outputs.
      vae, vae_params: the frozen base VAE (no LoRA); its posterior *mean* is the restoration's latent.
      scaling_factor: the VAE's latent scale (0.18215 for SD 2.1).
      x_lq: [B, H, W, 3] LQ images in [-1, 1] (upsampled to the output size), or
      z_lq: [B, h, w, 4] scaled LQ latents instead, decoded first (for callers that only hold latents).
    """
    if (x_lq is None) == (z_lq is None):
        raise ValueError("restorer_teacher: give exactly one of x_lq (image) or z_lq (latent)")
    if x_lq is None:
        x_lq = vae.apply({"params": vae_params}, z_lq / scaling_factor, method="decode")
    x_hq = jnp.clip(restore(jnp.clip(x_lq, -1.0, 1.0)), -1.0, 1.0)
    mean, _ = vae.apply({"params": vae_params}, x_hq, method="encode")
    z = jax.lax.stop_gradient(mean.astype(jnp.float32) * scaling_factor)
    return RestoredLatentTeacher(z_restored=z, schedule=schedule)
