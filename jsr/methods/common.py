"""Pieces several methods share: the optimizer from the config, batch images, the reconstruction loss, score
networks over the shared base, LPIPS weights, stand-in LoRAs for random bases, and teacher loading."""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from jsr.models import lora as L
from jsr.models.common import host_rng
from jsr.sr import losses
from jsr.sr.teachers import UNetTeacher


def make_optimizer(lr: float, *, weight_decay: float = 1e-2, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0, warmup_steps: int = 0,
                   total_steps: int | None = None, schedule: str = "constant") -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a ``constant`` / ``cosine`` / ``linear`` schedule after warm-up
    (OSEDiff/CTSR: AdamW, constant lr, clip 1.0)."""
    if schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif schedule in ("cosine", "linear"):
        if not total_steps:
            raise ValueError(f"lr schedule {schedule!r} needs total_steps")
        decay = total_steps - warmup_steps
        sched = (optax.cosine_decay_schedule(lr, decay) if schedule == "cosine"
                 else optax.linear_schedule(lr, 0.0, decay))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r} (constant, cosine, linear)")
    if warmup_steps:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), sched], [warmup_steps])
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*chain)


def optimizer(config: Any) -> optax.GradientTransformation:
    """The AdamW of ``config.optim`` (one per update group: each group keeps its own state)."""
    o = config.optim
    return make_optimizer(o.lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                          warmup_steps=o.warmup_steps, total_steps=config.total_steps, schedule=o.schedule)


def images(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(x_lq, x_hq)`` in [-1, 1] float32 from a batch's ``lq``/``hq`` NHWC images in [0, 1]."""
    return batch["lq"].astype(jnp.float32) * 2.0 - 1.0, batch["hq"].astype(jnp.float32) * 2.0 - 1.0


def reconstruction(config: Any) -> Callable[..., tuple[jax.Array, dict]]:
    """``rec(x_sr, x_hq, frozen, l2=, lp=) -> (loss, parts)``: ``config.loss``'s L2 + LPIPS (LPIPS weights in
    ``frozen["lpips"]``; images in [-1, 1])."""
    lw = config.loss

    def rec(x_sr, x_hq, frozen, l2=lw.l2, lp=lw.lpips):
        fn = losses.lpips_loss_fn(frozen["lpips"]) if lp else None
        return losses.reconstruction_loss(x_sr, x_hq, fn, l2_weight=l2, lpips_weight=lp)

    return rec


def net(models: Any, frozen: Mapping[str, Any], lora: L.LoRA | None) -> UNetTeacher:
    """The shared frozen UNet base (``frozen["unet"]``) + ``lora`` as a score network."""
    return UNetTeacher(params=frozen["unet"], lora=lora, schedule=models.schedule, unet=models.unet)


def vsd_term(models: Any, frozen: Mapping[str, Any], fake_unet: L.LoRA, z_hat: jax.Array, c: jax.Array,
             c_neg: jax.Array, rng: jax.Array, loss_config: Any,
             t: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """``(loss_config.vsd * L_vsd, parts)``: variational score distillation of the generator's latent ``z_hat``
    [B, h, w, 4] between the frozen base (guided by ``loss_config.cfg_scale`` against ``c_neg``) and the fake
    score ``fake_unet`` (a LoRA on the same base), both conditioned on ``c`` [B, L, D]. Timesteps: ``t`` [B] when
    given (RCOD's code-dependent draws), else uniform in ``[vsd_t_min, vsd_t_max)`` (OSEDiff)."""
    draw = {"t": t} if t is not None else {"t_min": loss_config.vsd_t_min, "t_max": loss_config.vsd_t_max}
    vsd, parts = losses.vsd_loss(z_hat, c, c_neg, rng, real_eps=net(models, frozen, None).eps,
                                 fake_eps=net(models, frozen, fake_unet).eps, schedule=models.schedule,
                                 cfg_scale=loss_config.cfg_scale, **draw)
    return loss_config.vsd * vsd, parts


def fake_score_update(models: Any, config: Any,
                      condition: Callable[[Mapping[str, Any], Mapping[str, Any]], jax.Array] | None = None) -> Any:
    """The VSD fake score's own update (group ``fake``, LoRA at ``params["fake"]["unet"]``), run after the
    generator's: it learns to denoise the generator's latent ``carry["z_hat"]`` under the prompt embeddings
    ``condition(batch, carry)`` [B, L, D] (default ``batch["c"]``; RCOD passes the prompt its VSD used)."""
    from jsr.methods.api import Update  # api imports nothing from here; the import is local to keep it that way

    cond = condition or (lambda batch, carry: batch["c"])

    def fake_loss(params, frozen_, batch, rng_, carry):
        loss, parts = losses.fake_score_loss(carry["z_hat"], cond(batch, carry), rng_,
                                             fake_output=net(models, frozen_, params["fake"]["unet"]).output,
                                             schedule=models.schedule)
        return loss, (parts, carry)

    return Update("fake", fake_loss, optimizer(config))


def base_frozen(config: Any, base: Any, rng: jax.Array, *, lpips: bool = True) -> dict[str, Any]:
    """The frozen tree every method starts from: the base ``unet``/``vae``, the negative prompt ``c_neg``, and
    the LPIPS weights when ``lpips`` and ``config.loss.lpips > 0``."""
    frozen: dict[str, Any] = {"unet": base.unet_params, "vae": base.vae_params,
                              "c_neg": base.prompts.negative(config.negative_prompt)}
    if lpips and config.loss.lpips > 0:
        frozen["lpips"] = lpips_params(config, base, jax.random.fold_in(rng, 7))
    return frozen


def lpips_params(config: Any, base: Any, rng: jax.Array) -> Any:
    """LPIPS-VGG weights for the training loss: ``config.loss.lpips_vgg``/``lpips_heads`` when given, else the
    files where PyTorch keeps them (torch hub's ``vgg16-397923af.pth``, the ``lpips`` package's ``vgg.pth``:
    :mod:`jsr.metrics.files`, as evaluate.py finds them); a random trunk on random bases only."""
    from jsr.metrics import files
    from jsr.metrics.lpips import LPIPS, load_lpips_params
    from jsr.models.common import init_params, random_params

    paths = [p for p in (config.loss.lpips_vgg, config.loss.lpips_heads) if p]
    if paths:
        return load_lpips_params(*paths)
    if not config.loss.lpips or base.random_weights:
        # Unused by the loss (shapes only matter), or a random trunk: random-base runs (the tiny model) never look
        # for files. Drawn on the host (compiling LPIPS' init cost ~20 s of a tiny run's start); traced (the
        # abstract set-up of benchmarks/export_programs.py) it stays in the program.
        if isinstance(rng, jax.core.Tracer):
            return init_params(LPIPS(), rng)
        return random_params(LPIPS(), rng)
    found = files.discover("lpips")
    if found is None:
        raise ValueError("loss.lpips > 0 needs LPIPS weights: " + files.why_missing("lpips", how=True) +
                         "; or set loss.lpips_vgg=<vgg16-397923af.pth> and loss.lpips_heads=<lpips "
                         "weights/v0.1/vgg.pth> (or loss.lpips=0); python -m jsr.metrics files lists where jsr looked")
    logging.info("LPIPS loss weights found: %s", ", ".join(str(p) for p in found))
    return load_lpips_params(*(str(p) for p in found))


def random_lora(rng: jax.Array, params: Any, spec: L.LoRASpec, std: float = 0.02) -> L.LoRA:
    """A LoRA with gaussian ``a`` and non-zero ``b ~ N(0, std^2)`` (a stand-in teacher for runs without weights).

    The ``b`` factors are drawn on the host (numpy, one generator per factor keyed by ``rng`` and the factor's
    path): a JAX draw per factor compiled one program per shape, ~18 s of a tiny run's start on 2 cores."""
    lo = L.init(rng, params, spec)
    flat = traverse_util.flatten_dict(lo.factors)
    paths = [p for p in flat if p[-1] == "b"]
    key = jax.random.fold_in(rng, 1)
    if isinstance(key, jax.core.Tracer):  # eval_shape of a setup: the same shapes, inside the program
        for p in paths:
            flat[p] = std * jax.random.normal(jax.random.fold_in(key, zlib.crc32("/".join(p).encode()) & 0x7FFFFFFF),
                                              flat[p].shape, jnp.float32)
    else:
        for p in paths:
            gen = host_rng(key, "/".join(p))
            flat[p] = jnp.asarray((std * gen.standard_normal(flat[p].shape)).astype(np.float32))
    return dataclasses.replace(lo, factors=traverse_util.unflatten_dict(flat))


def load_unet_vae_loras(path: str, base: Any) -> dict[str, L.LoRA]:
    """``{"unet": LoRA, "vae": LoRA?}`` of an OSEDiff-form model: a jsr export (any method whose trees include
    ``unet``), an OSEDiff release ``.pkl`` or a peft file (:func:`jsr.methods.export.read_source`)."""
    from jsr.methods.export import read_source

    src = read_source(path, base)
    roles = src.roles
    if "unet" not in roles:
        raise ValueError(f"{path}: expected an OSEDiff-form model with a UNet LoRA, found roles {sorted(roles)}")
    return {k: v for k, v in roles.items() if k in ("unet", "vae")}


def teacher_loras(path: str, base: Any, rng: jax.Array, what: str, option: str) -> dict[str, L.LoRA]:
    """A teacher's ``{"unet", "vae"}`` LoRAs from ``path``; with no path, seeded random stand-ins on a random
    base only (``option`` names the config field in the error)."""
    if path:
        logging.info("%s from %s", what, path)
        return load_unet_vae_loras(path, base)
    if not base.random_weights:
        raise ValueError(f"{option} is empty: this needs a {what} LoRA (an OSEDiff release .pkl, a peft "
                         "file, or a jsr export folder); only random stand-in bases (the embedded tiny model, "
                         "`python -m jsr.weights write-tiny`) run with random teachers")
    logging.warning("no %s given (%s); using a seeded random LoRA (random base only)", what, option)
    return {"unet": random_lora(jax.random.fold_in(rng, 1), base.unet_params, L.OSEDIFF_UNET),
            "vae": random_lora(jax.random.fold_in(rng, 2), base.vae_params, L.OSEDIFF_VAE)}


PICKLE_SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt", ".bin")


def pickle_mentions(path: str | os.PathLike, needle: bytes) -> bool:
    """Whether ``path`` is a ``torch.save`` file (by suffix) whose pickle names ``needle`` (a release's own dict
    key), without reading its tensors. False for folders, other files and damaged files (the generic readers
    report those)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in PICKLE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # the pre-1.6 format: the pickled dict comes before the storages
                f.seek(0)
                return needle in f.read(8 << 20)
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if i.filename.endswith("data.pkl")]
            return bool(names) and needle in z.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
