"""CTSR (controllable one-step SR): stage 1 distils a fidelity and a realism teacher into one student; stage 2
learns the control flow between the stage-1 solution (t = 0, realism) and the fidelity end (t = 1).

=========  ===========================================  ==============================================================
stage      trainable groups                             update per step
=========  ===========================================  ==============================================================
1          ``student`` {UNet LoRA + conv_in, VAE enc.}   L_rec + dual teacher (L_fl, L_rn; Alg. 1), the student
           initialised from the realism teacher         starting as the realism teacher
2          ``control`` {UNet LoRA}                      the control-flow loss over t in [0, 1] (Eq. 5-9) on top of the
                                                        frozen stage-1 model
=========  ===========================================  ==============================================================

Teachers (``ctsr.realism``, ``ctsr.fidelity``) are OSEDiff-form models: an OSEDiff release ``.pkl``, a peft file
or a jsr export. ``ctsr.fidelity_kind="restorer"`` takes a *pixel-space* fidelity teacher instead (ResShift/SinSR-
like, as the paper uses): ``ctsr.fidelity`` then names a Python callable ``package.module:function`` mapping LQ
images [B, H, W, 3] in [-1, 1] to restored images in [-1, 1] (pure JAX), seen in the latent space through
``jsr.sr.teachers.restorer_teacher``. With no file and a random stand-in base (the embedded tiny model) seeded
random LoRAs stand in for the teachers.

Inference: the stage-1 student (``unet``, ``vae``) and, after stage 2, the ``control`` LoRA; knobs ``t`` (the
control), ``t_steps`` (Euler steps of the learned flow), ``t_scale`` (UNet timestep = t * t_scale, recorded by
stage 2's export). ``t = 0`` reproduces the stage-1 output exactly. FiDeSR's LFIM acts on the implied residual
``z_L - z(t)`` (:mod:`jsr.methods.lfim_knobs`; gains 0 by default), so CTSR has two controls at once, ``t`` and
the LFIM gains: no published method combines them.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.methods.lfim_knobs import ImageForLFIM, LFIM_KNOBS, apply_lfim
from jsr.models import lora as L
from jsr.sr import generator, losses
from jsr.sr.teachers import restorer_teacher

CONTROL_UNET = L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=4, alpha=8.0)
_NEEDS_CONTROL = "a CTSR control LoRA (stage 2)"


def restorer_from_name(spec: str) -> Callable[[jax.Array], jax.Array]:
    """The callable ``package.module:function`` (a pixel-space restorer for ``ctsr.fidelity_kind=restorer``)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"ctsr.fidelity={spec!r}: with fidelity_kind='restorer' give 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"ctsr.fidelity={spec!r}: cannot import the restorer ({e})") from None
    if not callable(fn):
        raise ValueError(f"ctsr.fidelity={spec!r} is not callable")
    return fn


class CTSR(ImageForLFIM, Method):  # LFIM's spatial gate reads the LQ pixels
    name = "ctsr"
    label = "CTSR"
    roles = {"unet": "stage-1 student UNet LoRA (+ full conv_in)", "vae": "stage-1 VAE-encoder LoRA",
             "control": "stage-2 control UNet LoRA"}
    required_roles = ("unet",)
    knobs = (
        Knob("t", float, 0.0, "CTSR control: 0 = realism (the stage-1 output), 1 = fidelity", min=0.0, max=1.0,
             needs="control", needs_text=_NEEDS_CONTROL, sweep=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
        Knob("t_steps", int, 0, "CTSR: Euler steps along the learned flow (0 = one call)", min=0, max=64,
             static=True, needs="control", needs_text=_NEEDS_CONTROL),
        Knob("t_scale", float, 999.0, "CTSR: UNet timestep = t * t_scale; must match stage-2 training "
             "(recorded in its export)", min=1.0, max=1000.0, static=True, needs="control",
             needs_text=_NEEDS_CONTROL),
    ) + LFIM_KNOBS
    preview_knobs = {"t": 0.5}

    def config(self):
        return ml_collections.ConfigDict(dict(
            stage=1, realism="", fidelity="", fidelity_kind="lora", stage1="", g_time=5.5, fl_weight=2.0,
            rn_weight=1.0, t_min=20, t_max=980, t_scale=999.0))

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        c = generator.broadcast_prompt(c, z_lq.shape[0])  # one prompt for the batch (of images or tiles)
        z0 = registry.get("osediff").forward(models, unet_params, trees, z_lq, c, {})  # {}: no LFIM on z0
        student = generator.ctsr_student(models, unet_params, trees.get("unet"), trees.get("control"))
        z = generator.control_latent(z0, knobs["t"], c, student_eps=student.eps, t_scale=knobs["t_scale"],
                                     steps=knobs["t_steps"])
        return apply_lfim(z, z_lq, None, x_lq, knobs)

    def inference_trees(self, params, frozen):
        if "student" in params:
            return dict(params["student"])
        s1 = frozen["stage1"]
        return {**{k: v for k, v in s1.items() if v is not None}, "control": params["control"]["unet"]}

    def setup(self, config, base, rng) -> TrainSetup:
        stage = config.ctsr.stage
        if stage == 1:
            return self._stage1(config, base, rng)
        if stage == 2:
            return self._stage2(config, base, rng)
        raise ValueError(f"ctsr.stage must be 1 or 2, got {stage!r}")

    def _stage1(self, config, base, rng) -> TrainSetup:
        m = base.models
        c1 = config.ctsr
        frozen = common.base_frozen(config, base, rng)
        rec = common.reconstruction(config)
        k_gen, _, k_t = jax.random.split(rng, 3)
        realism = common.teacher_loras(c1.realism, base, jax.random.fold_in(k_t, 1), "realism teacher",
                                       "ctsr.realism")
        kind = c1.fidelity_kind
        if kind == "lora":
            fidelity = common.teacher_loras(c1.fidelity, base, jax.random.fold_in(k_t, 2), "fidelity teacher",
                                            "ctsr.fidelity")
            frozen["teachers"] = {"realism": realism["unet"], "fidelity": fidelity["unet"]}
            restore = None
        elif kind == "restorer":
            restore = restorer_from_name(c1.fidelity)
            frozen["teachers"] = {"realism": realism["unet"]}
        else:
            raise ValueError(f"ctsr.fidelity_kind must be 'lora' or 'restorer', got {kind!r}")
        vae_init = realism.get("vae") or L.init(k_gen, base.vae_params, L.OSEDIFF_VAE)
        # Alg. 1: the student starts as the realism teacher (a copy: its trees are trained, the teacher's not).
        params = {"student": {"unet": jax.tree.map(jnp.array, realism["unet"]),
                              "vae": jax.tree.map(jnp.array, vae_init)}}

        def s1_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_dual = jax.random.split(rng_)
            x_lq, x_hq = common.images(batch)
            s = params["student"]
            x_sr, z0s = generator.osediff_restore(m, frozen_["unet"], frozen_["vae"], s["unet"], s["vae"], x_lq,
                                                  batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            z0 = jax.lax.stop_gradient(generator.encode(m, frozen_["vae"], x_hq))
            if restore is None:
                fidelity_eps = common.net(m, frozen_, frozen_["teachers"]["fidelity"]).eps
            else:
                fidelity_eps = restorer_teacher(restore, vae=m.vae, vae_params=frozen_["vae"],
                                                scaling_factor=m.scaling_factor, schedule=m.schedule,
                                                x_lq=x_lq).eps
            dual, p = losses.dual_teacher_loss(
                z0s, z0, batch["c"], k_dual, student_eps=common.net(m, frozen_, s["unet"]).eps,
                fidelity_eps=fidelity_eps, realism_eps=common.net(m, frozen_, frozen_["teachers"]["realism"]).eps,
                schedule=m.schedule, g_time=c1.g_time, fl_weight=c1.fl_weight, rn_weight=c1.rn_weight,
                t_min=c1.t_min, t_max=c1.t_max)
            return total + dual, ({**parts, **p}, None)

        return TrainSetup(params=params, phases=[(0, [Update("student", s1_loss, common.optimizer(config))])],
                          frozen=frozen,
                          export={"student": {"unet": ExportEntry("unet"), "vae": ExportEntry("vae")}})

    def _stage2(self, config, base, rng) -> TrainSetup:
        m = base.models
        c2 = config.ctsr
        if not c2.stage1:
            raise ValueError("ctsr stage 2 needs ctsr.stage1: the stage-1 export folder (<workdir>/export/student) "
                             "or an OSEDiff-style LoRA file")
        frozen = common.base_frozen(config, base, rng, lpips=False)  # stage 2 has no L_rec
        frozen["stage1"] = common.load_unet_vae_loras(c2.stage1, base)
        k_gen, _, _ = jax.random.split(rng, 3)
        params = {"control": {"unet": L.init(k_gen, base.unet_params, CONTROL_UNET)}}
        osediff = registry.get("osediff")

        def s2_loss(params, frozen_, batch, rng_, carry):
            x_lq, _ = common.images(batch)
            s1 = frozen_["stage1"]
            z_lq = generator.encode(m, frozen_["vae"], x_lq, s1.get("vae"))
            z0 = jax.lax.stop_gradient(osediff.forward(m, frozen_["unet"], s1, z_lq, batch["c"], {}))
            teacher = generator.ctsr_student(m, frozen_["unet"], s1["unet"], None)
            student = generator.ctsr_student(m, frozen_["unet"], s1["unet"], params["control"]["unet"])
            loss, parts = losses.control_loss(z0, batch["c"], rng_, teacher_eps=teacher.eps,
                                              student_eps=student.eps, t_scale=c2.t_scale)
            return loss, (parts, None)

        return TrainSetup(params=params, phases=[(0, [Update("control", s2_loss, common.optimizer(config))])],
                          frozen=frozen, export={"control": {"unet": ExportEntry("control")}},
                          requires={"unet": str(c2.stage1), "vae": str(c2.stage1)},
                          knob_defaults={"t_scale": float(c2.t_scale)})


registry.register(CTSR)
