"""The one-step restorer as pure functions of (frozen base, LoRA trees, LQ batch, prompt embeddings, control t).

Images are NHWC float in **[-1, 1]** (``x_lq`` is the LQ image already upsampled x4 to the output size; outputs
are clipped to [-1, 1]); latents are NHWC ``[B, H/8, W/8, 4]`` in the *scaled* SD latent space
(``scaling_factor`` applied; the VAE itself works on unscaled latents). Prompt embeddings ``c`` are
``[B or 1, 77, D]`` from :mod:`jsr.sr.prompts`.

Three forms, all on the same frozen base (one copy: every function takes the base parameters as an argument
and each network differs only by its :class:`jsr.models.lora.LoRA`):

* **OSEDiff** (:func:`osediff_restore`): ``z_L = s E(x_LQ; L_vae)``, ``eps = U(z_L, 999, c; L_gen)``,
  ``z_hat = x0(z_L, eps, 999)``, ``x_SR = clip(D(z_hat / s))``. OSEDiff's ``scheduler.step`` at 999 with one
  inference step reduces to exactly this x0 (``abar_prev = 1``; its variance term is ``1e-10 * noise``).
* **PiSA-SR** (:func:`pisasr_restore`): residual at ``t = 1`` on the *base* VAE (no VAE LoRA),
  ``z_hat = z_L - eps`` with ``eps = lp * eps_pix + ls * (eps_pix+sem - eps_pix)`` (the raw UNet output, not
  converted through the schedule: PiSA-SR trains it as a residual). ``lp = ls = 1`` is one UNet call with both
  LoRAs; other weights take two calls, as PiSA-SR's adjustable inference.
* **CTSR** (:func:`ctsr_restore`): the stage-1 OSEDiff-form latent ``z0``, moved along the stage-2 flow to
  the control ``t in [0, 1]`` (``control_latent``): ``z(t) = z0 + t eps_S(z0, 999 t, c)`` with
  the student ``S`` = base + stage-1 LoRA + control LoRA. ``t = 0`` returns the stage-1 output exactly; the
  control is the UNet timestep input ``999 t`` (CTSR Sec. 4.4/5.4: realism at step 0, fidelity at step T).

VAE posterior: OSEDiff and PiSA-SR encode with ``latent_dist.sample()`` both in training and at test time.
Here ``encode`` samples ``mean + std * n`` when given an ``rng`` (training, as they do) and returns the posterior
*mean* without one (inference: a deterministic output; SD's VAE posterior std is small, so the two barely
differ).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models import lora as lora_lib
from jsr.sr import schedule as sched
from jsr.sr.schedule import DDPMSchedule
from jsr.sr.teachers import UNetTeacher

# eps(z_t [B, h, w, 4], t [B] float32, c [B, L, D]) -> eps [B, h, w, 4]: a score network (jsr.sr.teachers).
EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

OSEDIFF_TIMESTEP = 999
PISASR_TIMESTEP = 1


@dataclasses.dataclass(frozen=True)
class SDModels:
    """The static half of the base: modules and constants (hashable, closed over by jitted functions).

    Attributes:
      unet: ``UNet2DConditionModel`` module.
      vae: ``AutoencoderKL`` module (``encode -> (mean, logvar)``, ``decode``; unscaled latents).
      schedule: the base's DDPM schedule.
      scaling_factor: VAE latent scale (``vae/config.json``; 0.18215 for SD 2.1).
    """

    unet: nn.Module
    vae: nn.Module
    schedule: DDPMSchedule
    scaling_factor: float

    def __hash__(self) -> int:  # the schedule holds an array; identity is what jit caching needs
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def encode(models: SDModels, vae_params: Any, x: jax.Array, vae_lora: lora_lib.LoRA | None = None,
           rng: jax.Array | None = None) -> jax.Array:
    """``s * E(x)``: images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/8, W/8, 4] (float32).

    ``vae_lora``: the encoder LoRA (OSEDiff). ``rng``: sample the posterior (``mean + exp(logvar / 2) n``);
    ``None``: its mean.
    """
    mean, logvar = models.vae.apply(lora_lib.variables(vae_params, vae_lora), x, method="encode")
    z = mean.astype(jnp.float32)
    if rng is not None:
        z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * jax.random.normal(rng, z.shape, jnp.float32)
    return z * models.scaling_factor


def decode(models: SDModels, vae_params: Any, z: jax.Array) -> jax.Array:
    """``clip(D(z / s), -1, 1)``: scaled latents -> images [B, 8h, 8w, 3] in [-1, 1] (float32). The decoder is
    never LoRA'd (OSEDiff's VAE LoRA targets the encoder and ``quant_conv`` only)."""
    x = models.vae.apply({"params": vae_params}, z / models.scaling_factor, method="decode")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def osediff_latent(models: SDModels, unet_params: Any, unet_lora: lora_lib.LoRA | None, z_lq: jax.Array,
                   c: jax.Array, timestep: float = OSEDIFF_TIMESTEP) -> jax.Array:
    """OSEDiff's one step in latent space: ``x0(z_L, U(z_L, 999, c; L_gen), 999)`` ([B, h, w, 4] float32).
    Handles epsilon and v-prediction bases through the schedule."""
    t = jnp.full((z_lq.shape[0],), timestep, jnp.float32)
    net = UNetTeacher(params=unet_params, lora=unet_lora, schedule=models.schedule, unet=models.unet)
    return sched.x0_from_output(models.schedule, z_lq, net.output(z_lq, t, _prompt(c, z_lq)), t)


def osediff_restore(models: SDModels, unet_params: Any, vae_params: Any, unet_lora: lora_lib.LoRA | None,
                    vae_lora: lora_lib.LoRA | None, x_lq: jax.Array, c: jax.Array,
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """OSEDiff generator: LQ images [B, H, W, 3] in [-1, 1] -> ``(x_SR [B, H, W, 3] in [-1, 1], z_hat)``.

    ``z_hat`` [B, H/8, W/8, 4] is the scaled output latent (what VSD and CTSR's losses act on). ``rng`` samples
    the VAE posterior (training); ``None`` uses its mean.
    """
    z_lq = encode(models, vae_params, x_lq, vae_lora, rng)
    z_hat = osediff_latent(models, unet_params, unet_lora, z_lq, c)
    return decode(models, vae_params, z_hat), z_hat


def pisasr_latent(models: SDModels, unet_params: Any, pix_lora: lora_lib.LoRA | None,
                  sem_lora: lora_lib.LoRA | None, z_lq: jax.Array, c: jax.Array, lambda_pix: float = 1.0,
                  lambda_sem: float = 1.0, timestep: float = PISASR_TIMESTEP) -> jax.Array:
    """PiSA-SR's residual step ``z_L - (lp eps_pix + ls (eps_pix+sem - eps_pix))``, [B, h, w, 4] float32.

    ``sem_lora=None`` is the pixel stage (``z_L - eps_pix``, ``lambda_pix`` still scales it). ``eps_pix+sem`` is
    the UNet with both LoRAs applied together (stacked exactly, ``lora.stack``).
    """
    t = jnp.full((z_lq.shape[0],), timestep, jnp.float32)
    c = _prompt(c, z_lq)

    def out(lo):
        return UNetTeacher(params=unet_params, lora=lo, schedule=models.schedule, unet=models.unet).output(z_lq, t, c)

    if sem_lora is None:
        return z_lq.astype(jnp.float32) - lambda_pix * out(pix_lora)
    both = sem_lora if pix_lora is None else lora_lib.stack([(pix_lora, 1.0), (sem_lora, 1.0)], unet_params)
    if isinstance(lambda_pix, (int, float)) and isinstance(lambda_sem, (int, float)) and lambda_pix == lambda_sem == 1:
        return z_lq.astype(jnp.float32) - out(both)  # lp eps_pix + (eps_both - eps_pix) = eps_both: one call
    e_pix = out(pix_lora)
    return z_lq.astype(jnp.float32) - (lambda_pix * e_pix + lambda_sem * (out(both) - e_pix))


def pisasr_restore(models: SDModels, unet_params: Any, vae_params: Any, pix_lora: lora_lib.LoRA | None,
                   sem_lora: lora_lib.LoRA | None, x_lq: jax.Array, c: jax.Array, lambda_pix: float = 1.0,
                   lambda_sem: float = 1.0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """PiSA-SR generator on the base VAE: LQ images in [-1, 1] -> ``(x_SR in [-1, 1], z_hat)``."""
    z_lq = encode(models, vae_params, x_lq, None, rng)
    z_hat = pisasr_latent(models, unet_params, pix_lora, sem_lora, z_lq, c, lambda_pix, lambda_sem)
    return decode(models, vae_params, z_hat), z_hat


def ctsr_student(models: SDModels, unet_params: Any, stage1_lora: lora_lib.LoRA | None,
                 control_lora: lora_lib.LoRA | None) -> UNetTeacher:
    """CTSR's stage-2 student ``S`` as a score network: base + stage-1 LoRA + control LoRA (stacked exactly).
    ``control_lora=None`` is the frozen stage-1 model ``T_S`` (the stage-2 teacher, and S at initialisation)."""
    if control_lora is None:
        lo = stage1_lora
    elif stage1_lora is None:
        lo = control_lora
    else:
        lo = lora_lib.stack([(stage1_lora, 1.0), (control_lora, 1.0)], unet_params)
    return UNetTeacher(params=unet_params, lora=lo, schedule=models.schedule, unet=models.unet)


def ctsr_restore(models: SDModels, unet_params: Any, vae_params: Any, stage1_lora: lora_lib.LoRA | None,
                 vae_lora: lora_lib.LoRA | None, control_lora: lora_lib.LoRA | None, x_lq: jax.Array,
                 c: jax.Array, t: jax.Array | float = 0.0, *, t_scale: float = float(OSEDIFF_TIMESTEP),
                 steps: int = 0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """CTSR inference with the fidelity/realism control ``t`` in [0, 1] (scalar or [B]).

    ``z0`` = the stage-1 (OSEDiff-form) latent with ``stage1_lora``/``vae_lora``; then
    ``jsr.sr.control_latent(z0, t, ...)`` with the student :func:`ctsr_student` (UNet timestep
    ``t * t_scale``; ``steps`` as there). ``t = 0`` (or ``control_lora=None`` and ``t = 0``) is exactly the
    stage-1 output. Returns ``(x_SR [B, H, W, 3] in [-1, 1], z [B, h, w, 4])``.
    """
    z_lq = encode(models, vae_params, x_lq, vae_lora, rng)
    c = _prompt(c, z_lq)
    z0 = osediff_latent(models, unet_params, stage1_lora, z_lq, c)
    student = ctsr_student(models, unet_params, stage1_lora, control_lora)
    z = control_latent(z0, t, c, student_eps=student.eps, t_scale=t_scale, steps=steps)
    return decode(models, vae_params, z), z


def _prompt(c: jax.Array, z: jax.Array) -> jax.Array:
    return broadcast_prompt(c, z.shape[0])


def broadcast_prompt(c: jax.Array, batch: int) -> jax.Array:
    """[1, L, D] or [B, L, D] -> [B, L, D]."""
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return jnp.broadcast_to(c, (batch,) + c.shape[1:])
    raise ValueError(f"prompt embeddings have batch {c.shape[0]}, want 1 or {batch}")


def control_timestep(t: jax.Array, t_scale: float = 999.0) -> jax.Array:
    """CTSR's control ``t in [0, 1]`` -> UNet timestep input ``t * t_scale`` (float).

    The paper: "assuming sampling steps range from 0 to T, the distilled model exhibits better fidelity at step
    T, better realness at step 0"; so ``t_scale = T = 999`` (the last DDPM step) by default.
    """
    return jnp.asarray(t, jnp.float32) * t_scale


def control_latent(z0: jax.Array, t: jax.Array, c: jax.Array, *, student_eps: EpsFn, t_scale: float = 999.0,
                   steps: int = 0) -> jax.Array:
    """CTSR inference: move the stage-1 latent ``z0`` to control ``t in [0, 1]`` ([B] or scalar).

    ``steps == 0`` (default): the flow point of Eq. 5 with the student in place of the teacher,
    ``z(t) = z0 + t eps_S(z0, t, c)``: one UNet call whose timestep input is the control (the paper: "the input
    timesteps t for the diffusion UNet ... act as an adjustable parameter"). ``steps = K >= 1``: K Euler steps
    of the learned flow (Eq. 7), ``z <- z + Δ eps_S(z, s, c)`` from ``s = 0`` to ``t``. Both return ``z0``
    exactly at ``t = 0`` (the stage-1 result).
    """
    z0 = z0.astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z0.shape[0],))
    tb = t.reshape(-1, 1, 1, 1)
    if steps == 0:
        return z0 + tb * student_eps(z0, control_timestep(t, t_scale), c).astype(jnp.float32)
    z = z0
    for k in range(steps):
        s = t * (k / steps)
        z = z + (tb / steps) * student_eps(z, control_timestep(s, t_scale), c).astype(jnp.float32)
    return z
