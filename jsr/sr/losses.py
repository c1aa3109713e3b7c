"""Training losses of the one-step restorers: reconstruction, VSD (+ the fake score's own loss), CSD, CTSR's
stage-1 dual-teacher loss and stage-2 control loss.

Every loss is a pure function of arrays and *score callables* and returns ``(scalar, parts)`` where ``parts`` is a
flat dict of named float32 scalars for logging. A score callable is ``eps(z_t, t, c) -> eps``: ``z_t``
[B, h, w, 4] NHWC latents in the *scaled* SD latent space, ``t`` [B] float32 UNet timesteps, ``c`` [B, L, D]
prompt embeddings, result [B, h, w, 4] epsilon predictions (``jsr.sr.teachers`` builds them from the shared
frozen base + a LoRA tree, or from a pixel-space restorer). Images are NHWC in [-1, 1].

"MSE" and ``|.|^2`` are means over all elements (PyTorch's ``F.mse_loss`` convention the papers' code uses; the
papers' weights were tuned with it). Randomness comes from the explicit ``rng`` argument only; the sampling
losses also take explicit ``t`` (and ``noise``) that override the draws (tests, or noise shared between losses),
and then ``rng`` may be ``None``.

Formulas (``x0(z_t, eps, t) = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, ``sg`` = stop-gradient):

* ``reconstruction_loss``: ``l2 * MSE(x_sr, x_hq) + lp * mean LPIPS(x_sr, x_hq)`` (OSEDiff / CTSR Eq. 1).
* ``vsd_loss`` (OSEDiff, DMD form in x0 space): ``t ~ U{20..979}``, ``z_t = add_noise(sg(z_hat), n, t)``,
  ``x_real = x0(CFG(eps_real; c, c_neg, 7.5))``, ``x_fake = x0(eps_fake(z_t, t, c))`` (both without gradient),
  ``w = mean|z_hat - x_real|`` per sample, ``g = (x_fake - x_real) / w``, ``L = MSE(z_hat, sg(z_hat - g))``
  whose gradient w.r.t. ``z_hat`` is ``2 g / numel``.
* ``fake_score_loss``: the LoRA fake score's diffusion loss on ``sg(z_hat)``, ``t' ~ U{0..999}``.
* ``csd_loss`` (PiSA-SR): as VSD with ``t ~ U{20..499}`` and the frozen base only: ``x_fake`` is the
  negative-prompt (unconditional branch) prediction of the same CFG call. FiDeSR's variant weights each element
  by its DAW map and adds ``1e-6`` to ``w`` (``weight_map=``, ``w_eps=``).
* ``dual_teacher_loss`` (CTSR Eq. 2-4, Alg. 1), ``control_loss`` (CTSR Eq. 5-9): see their docstrings.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jsr.sr import schedule as sched
from jsr.sr.generator import broadcast_prompt, control_timestep  # noqa: F401 - re-exported (older imports)
from jsr.sr.schedule import DDPMSchedule

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]
Parts = dict[str, jax.Array]


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def sample_timesteps(rng: jax.Array, batch: int, t_min: int, t_max: int) -> jax.Array:
    """Integer DDPM timesteps uniform in ``[t_min, t_max)`` (as ``torch.randint``), returned as float32 [B]."""
    return jax.random.randint(rng, (batch,), t_min, t_max).astype(jnp.float32)


def _draw(rng: jax.Array | None, shape: tuple[int, ...], t_min: int, t_max: int, t: jax.Array | None,
          noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Timesteps [B] and Gaussian noise of ``shape``; explicit ``t`` / ``noise`` override the draws (tests, or a
    caller sharing noise between losses)."""
    if (t is None or noise is None) and rng is None:
        raise ValueError("need an rng key unless both t and noise are given")
    k_t, k_n = jax.random.split(rng) if rng is not None else (None, None)
    if t is None:
        t = sample_timesteps(k_t, shape[0], t_min, t_max)
    if noise is None:
        noise = jax.random.normal(k_n, shape, jnp.float32)
    return jnp.asarray(t, jnp.float32), noise.astype(jnp.float32)


def lpips_loss_fn(params: Mapping, dtype: Any = None) -> LpipsFn:
    """An ``lpips_fn(x, y) -> [B]`` for :func:`reconstruction_loss`: LPIPS-VGG (``jsr.metrics.lpips``) on images
    in **[-1, 1]** (the range inside jsr's models; the LPIPS module's own input range, so no rescaling)."""
    from jsr.metrics.lpips import LPIPS

    module = LPIPS(dtype=dtype)
    return lambda x, y: module.apply({"params": params}, x, y)


# --------------------------------------------------------------------------------------------- reconstruction

def reconstruction_loss(x_sr: jax.Array, x_hq: jax.Array, lpips_fn: LpipsFn | None, *, l2_weight: float = 1.0,
                        lpips_weight: float = 2.0) -> tuple[jax.Array, Parts]:
    """``L_rec = l2_weight * MSE(x_sr, x_hq) + lpips_weight * mean_b LPIPS(x_sr, x_hq)``.

    Args:
      x_sr, x_hq: [B, H, W, 3] images in [-1, 1].
      lpips_fn: ``(x, y) -> [B]`` perceptual distance on [-1, 1] images (:func:`lpips_loss_fn`); ``None`` only
        allowed with ``lpips_weight == 0``.
    Returns: ``(L_rec, {"rec", "rec_l2", "rec_lpips"})``.
    """
    l2 = _mse(x_sr, x_hq)
    if lpips_weight:
        if lpips_fn is None:
            raise ValueError("reconstruction_loss: lpips_weight is non-zero but no lpips_fn was given")
        lp = jnp.mean(lpips_fn(x_sr, x_hq).astype(jnp.float32))
    else:
        lp = jnp.zeros((), jnp.float32)
    total = l2_weight * l2 + lpips_weight * lp
    return total, {"rec": total, "rec_l2": l2, "rec_lpips": lp}


# ------------------------------------------------------------------------------------------ score distillation

def cfg_eps(eps_fn: EpsFn, z_t: jax.Array, t: jax.Array, c: jax.Array, c_neg: jax.Array,
            scale: float) -> tuple[jax.Array, jax.Array]:
    """Classifier-free guidance in one batched call: ``(eps_neg + scale (eps_pos - eps_neg), eps_neg)``.

    The negative prompt plays the unconditional branch (OSEDiff / PiSA-SR). For v-prediction models the same
    combination of raw outputs gives the same x0, since the output->x0 map is affine with weights summing to 1.
    """
    b = z_t.shape[0]
    c_neg = broadcast_prompt(c_neg, b)
    both = eps_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]), jnp.concatenate([c_neg, c]))
    both = both.astype(jnp.float32)
    neg, pos = both[:b], both[b:]
    return neg + scale * (pos - neg), neg


def score_distillation(z_hat: jax.Array, x_real: jax.Array, x_fake: jax.Array, *,
                       weight_map: jax.Array | None = None, w_eps: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """DMD-form distribution-matching loss shared by VSD and CSD.

    ``w = mean_{hwc} |z_hat - x_real| + w_eps`` (per sample), ``g = (x_fake - x_real) / w``,
    ``L = MSE(z_hat, sg(z_hat - g))``: numerically ``mean(g^2)``, gradient ``dL/dz_hat = 2 g / z_hat.size``.
    ``x_real``/``x_fake`` are treated as constants. ``weight_map`` (FiDeSR's DAW weight on the latent grid,
    [B, h, w, 1] or broadcastable, no gradient) multiplies each element's ``(z - sg(z - g))^2`` before the mean;
    ``w_eps`` is FiDeSR's ``+ 1e-6`` on ``w`` (0: OSEDiff's and PiSA-SR's form). Returns ``(L, w [B])``.
    """
    z = z_hat.astype(jnp.float32)
    x_real = jax.lax.stop_gradient(x_real.astype(jnp.float32))
    x_fake = jax.lax.stop_gradient(x_fake.astype(jnp.float32))
    w = jnp.mean(jnp.abs(jax.lax.stop_gradient(z) - x_real), axis=tuple(range(1, z.ndim)), keepdims=True)
    if w_eps:
        w = w + w_eps
    g = (x_fake - x_real) / w
    if weight_map is None:
        return _mse(z, jax.lax.stop_gradient(z - g)), w.reshape(-1)
    diff = jnp.square(z - jax.lax.stop_gradient(z - g))
    return jnp.mean(jax.lax.stop_gradient(weight_map).astype(jnp.float32) * diff), w.reshape(-1)


def vsd_loss(z_hat: jax.Array, c: jax.Array, c_neg: jax.Array, rng: jax.Array, *, real_eps: EpsFn,
             fake_eps: EpsFn, schedule: DDPMSchedule, cfg_scale: float = 7.5, t_min: int = 20,
             t_max: int = 980, t: jax.Array | None = None,
             noise: jax.Array | None = None) -> tuple[jax.Array, Parts]:
    """OSEDiff's variational score distillation (x0 / DMD form) on the generator's latent output.

    Args:
      z_hat: [B, h, w, 4] generator output latent (scaled), differentiable.
      c, c_neg: [B, L, D] prompt / [1 or B, L, D] negative-prompt embeddings.
      rng: PRNG key (timesteps and noise).
      real_eps: the frozen base (no LoRA) as an eps callable; guided with ``cfg_scale`` against ``c_neg``.
      fake_eps: the LoRA fake score, conditioned on ``c`` only.
      t_min, t_max: timesteps drawn uniformly from the integers in ``[t_min, t_max)`` (OSEDiff: 20, 980).
    Returns: ``(L_vsd, {"vsd", "vsd_w", "vsd_t"})``.
    """
    t, noise = _draw(rng, z_hat.shape, t_min, t_max, t, noise)
    z0 = jax.lax.stop_gradient(z_hat.astype(jnp.float32))
    z_t = sched.add_noise(schedule, z0, noise, t)
    eps_real, _ = cfg_eps(real_eps, z_t, t, c, c_neg, cfg_scale)
    eps_fake = fake_eps(z_t, t, c)
    x_real = sched.x0_from_eps(schedule, z_t, eps_real, t)
    x_fake = sched.x0_from_eps(schedule, z_t, eps_fake, t)
    loss, w = score_distillation(z_hat, x_real, x_fake)
    return loss, {"vsd": loss, "vsd_w": jnp.mean(w), "vsd_t": jnp.mean(t)}


def fake_score_loss(z_hat: jax.Array, c: jax.Array, rng: jax.Array, *, fake_output: EpsFn,
                    schedule: DDPMSchedule, t_min: int = 0, t_max: int | None = None, t: jax.Array | None = None,
                    noise: jax.Array | None = None) -> tuple[jax.Array, Parts]:
    """The VSD fake score's own denoising loss (OSEDiff ``diff_loss``), trained after each generator step.

    ``z = sg(z_hat)``, ``t' ~ U{t_min .. t_max-1}`` (default the whole schedule), ``n' ~ N(0, I)``,
    ``L = MSE(U(add_noise(z, n', t'), t', c; L_fake), target)`` with target ``n'`` for epsilon models and
    ``v`` for v-prediction models.

    Args:
      fake_output: the fake score's *raw* UNet output callable (equal to its eps for epsilon models).
    Returns: ``(L_fake, {"fake_score"})``.
    """
    z0 = jax.lax.stop_gradient(z_hat.astype(jnp.float32))
    c = jax.lax.stop_gradient(c)
    t_max = schedule.num_train_timesteps if t_max is None else t_max
    t, noise = _draw(rng, z0.shape, t_min, t_max, t, noise)
    z_t = sched.add_noise(schedule, z0, noise, t)
    loss = _mse(fake_output(z_t, t, c), sched.training_target(schedule, z0, noise, t))
    return loss, {"fake_score": loss}


def csd_loss(z_hat: jax.Array, c: jax.Array, c_neg: jax.Array, rng: jax.Array, *, base_eps: EpsFn,
             schedule: DDPMSchedule, cfg_scale: float = 7.5, t_min: int = 20,
             t_max: int = 500, t: jax.Array | None = None,
             noise: jax.Array | None = None, weight_map: jax.Array | None = None,
             w_eps: float = 0.0) -> tuple[jax.Array, Parts]:
    """PiSA-SR's classifier score distillation: VSD's form with the frozen base as both scores.

    ``x_real`` from the CFG-guided prediction (``cfg_scale`` against ``c_neg``), ``x_fake`` from the
    negative-prompt branch of the same call; ``t`` uniform over the integers in ``[t_min, t_max)``
    (PiSA-SR: 0.02 and 0.5 of 1000). ``weight_map``, ``w_eps``: FiDeSR's per-element weight and ``+ 1e-6``
    (:func:`score_distillation`). Returns ``(L_csd, {"csd", "csd_w", "csd_t"})``.
    """
    t, noise = _draw(rng, z_hat.shape, t_min, t_max, t, noise)
    z0 = jax.lax.stop_gradient(z_hat.astype(jnp.float32))
    z_t = sched.add_noise(schedule, z0, noise, t)
    eps_real, eps_neg = cfg_eps(base_eps, z_t, t, c, c_neg, cfg_scale)
    x_real = sched.x0_from_eps(schedule, z_t, eps_real, t)
    x_fake = sched.x0_from_eps(schedule, z_t, eps_neg, t)
    loss, w = score_distillation(z_hat, x_real, x_fake, weight_map=weight_map, w_eps=w_eps)
    return loss, {"csd": loss, "csd_w": jnp.mean(w), "csd_t": jnp.mean(t)}


# ------------------------------------------------------------------------------------------------------- CTSR

def teacher_term(teacher_eps: EpsFn, e_s: jax.Array, zs_t: jax.Array, z_t: jax.Array, t: jax.Array,
                 c: jax.Array, g_time: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One teacher's part of CTSR Eq. 2/3:
    ``|eps_T(zs_t) - eps_S(zs_t)|^2 + g_time |eps_T(zs_t) - eps_T(z_t)|^2``, ``e_s = eps_S(zs_t)`` given;
    returns (total, first, second)."""
    e_t_s = teacher_eps(zs_t, t, c).astype(jnp.float32)
    e_t_gt = jax.lax.stop_gradient(teacher_eps(z_t, t, c).astype(jnp.float32))
    first = _mse(e_t_s, e_s)
    second = _mse(e_t_s, e_t_gt)
    return first + g_time * second, first, second


def dual_teacher_loss(z0s: jax.Array, z0: jax.Array, c: jax.Array, rng: jax.Array, *, student_eps: EpsFn,
                      fidelity_eps: EpsFn, realism_eps: EpsFn, schedule: DDPMSchedule, g_time: float = 5.5,
                      fl_weight: float = 2.0, rn_weight: float = 1.0, t_min: int = 20,
                      t_max: int = 980, t: jax.Array | None = None,
                      noise: jax.Array | None = None) -> tuple[jax.Array, Parts]:
    """CTSR stage 1 (Eq. 2-4, Alg. 1): ``fl_weight L_fl + rn_weight L_rn`` (add ``L_rec`` separately).

    ``z_t = add_noise(z0, n, t)`` and ``zs_t = add_noise(z0s, n, t)`` share ``t`` and ``n``;
    ``L_fl = |eps_Tf(zs_t) - eps_S(zs_t)|^2 + g_time |eps_Tf(zs_t) - eps_Tf(z_t)|^2``, ``L_rn`` the same with
    ``T_r``. No stop-gradient except on the ground-truth branch (``z_t`` holds nothing trainable): as Alg. 1's
    ``L_s1.backward()``, the gradient reaches the student both through its output ``z0s`` (via the frozen
    teachers' and its own UNet's input) and through its UNet used as the score network ``eps_S``.

    Args:
      z0s: [B, h, w, 4] the student's output latent (differentiable).
      z0: [B, h, w, 4] ``E(x_HQ)`` scaled latent of the ground truth.
      student_eps: the student's UNet (its generator LoRA) as a score network.
      fidelity_eps, realism_eps: the teachers ``T_f``, ``T_r`` (frozen; any ``jsr.sr.teachers`` teacher).
      t_min, t_max: integer timesteps in ``[t_min, t_max)``. Alg. 1 only says "random timestep"; the default is
        the range of the VSD loss CTSR builds on (OSEDiff's 20..979).
    Defaults: the paper's ``lambda_fl = 2``, ``lambda_rn = 1``, ``gamma_time = 5.5``.
    Returns: ``(loss, {"dual", "fl", "rn", "fl_student", "fl_gt", "rn_student", "rn_gt"})``.
    """
    t, noise = _draw(rng, z0s.shape, t_min, t_max, t, noise)
    zs_t = sched.add_noise(schedule, z0s.astype(jnp.float32), noise, t)
    z_t = jax.lax.stop_gradient(sched.add_noise(schedule, z0.astype(jnp.float32), noise, t))
    # eps_S(zs_t) is the same in both terms: one UNet pass (and one backward, of the summed cotangents) instead
    # of two, so one UNet fewer to trace and compile in the step.
    e_s = student_eps(zs_t, t, c)
    fl, fl_a, fl_b = teacher_term(fidelity_eps, e_s, zs_t, z_t, t, c, g_time)
    rn, rn_a, rn_b = teacher_term(realism_eps, e_s, zs_t, z_t, t, c, g_time)
    total = fl_weight * fl + rn_weight * rn
    return total, {"dual": total, "fl": fl, "rn": rn, "fl_student": fl_a, "fl_gt": fl_b,
                   "rn_student": rn_a, "rn_gt": rn_b}


def control_loss(z0: jax.Array, c: jax.Array, rng: jax.Array, *, teacher_eps: EpsFn, student_eps: EpsFn,
                 t_scale: float = 999.0, t_pair: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, Parts]:
    """CTSR stage 2 (Eq. 5-9): distil the frozen stage-1 model ``T_S`` into a flow over the control ``t``.

    Reading (the equations, not Alg. 2, where they differ): with ``e(s) = eps_TS(z0, s, c)`` the frozen
    stage-1 UNet applied to the stage-1 output latent ``z0`` at control ``s`` (UNet timestep
    :func:`control_timestep`), the teacher's path is ``z_s = z0 + s e(s)`` (Eq. 5). For ``0 < t < t' < 1``
    (two uniform draws, sorted; Alg. 2 "ensure t' > t"),
    ``L = | t e(t) - t' e(t') + (t' - t) eps_S(z_t, t, c) |^2`` (Eq. 8), i.e. the student's step from
    ``z_t`` over ``Δt`` must cover the teacher's displacement ``z_t' - z_t`` (Eq. 7). Alg. 2 instead evaluates
    the teacher at ``z_t`` / ``z_t'`` and builds ``z_t' = z_t + t' e(t)`` (not ``Δt``, contradicting Eq. 6);
    we follow Eq. 5-8. The teacher terms carry no gradient; only ``eps_S`` is trained.

    Args:
      z0: [B, h, w, 4] stage-1 output latent (scaled; a constant here): ``jsr.sr.generator.osediff_latent``
        with the frozen stage-1 LoRAs. Alg. 2 re-encodes the decoded image ``x_0``; using the latent directly
        skips a VAE round trip that only adds its reconstruction error.
      teacher_eps: ``T_S`` (stage-1 base + LoRA) as an eps callable; student_eps: ``S`` (T_S + control LoRA).
      t_scale: see :func:`control_timestep`.
      t_pair: explicit ``(t, t')`` [B] each, overriding the draw.
    Returns: ``(L_ctrl, {"ctrl", "ctrl_t", "ctrl_t2"})``.
    """
    b = z0.shape[0]
    if t_pair is None:
        u = jax.random.uniform(rng, (2, b), jnp.float32)
        t, t2 = jnp.min(u, axis=0), jnp.max(u, axis=0)
    else:
        t, t2 = (jnp.broadcast_to(jnp.asarray(x, jnp.float32), (b,)) for x in t_pair)
    z0 = jax.lax.stop_gradient(z0.astype(jnp.float32))
    tt, tt2 = control_timestep(t, t_scale), control_timestep(t2, t_scale)
    e = jax.lax.stop_gradient(teacher_eps(jnp.concatenate([z0, z0]), jnp.concatenate([tt, tt2]),
                                          jnp.concatenate([c, c])).astype(jnp.float32))
    e_t, e_t2 = e[:b], e[b:]
    tb, t2b = t.reshape(b, 1, 1, 1), t2.reshape(b, 1, 1, 1)
    z_t = z0 + tb * e_t
    residual = tb * e_t - t2b * e_t2 + (t2b - tb) * student_eps(z_t, tt, c).astype(jnp.float32)
    loss = jnp.mean(jnp.square(residual))
    return loss, {"ctrl": loss, "ctrl_t": jnp.mean(t), "ctrl_t2": jnp.mean(t2)}
