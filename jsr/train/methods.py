"""Training methods as ordered :class:`jsr.train.step.Update` lists over the one shared frozen base.

=================  ===========================================  ======================================================
``method``         trainable groups (LoRA trees)                updates per step
=================  ===========================================  ======================================================
``osediff``        ``gen`` {unet (+ full conv_in), vae enc.},   ``gen``: L_rec + l_vsd VSD;  ``fake``: the fake score's
                   ``fake`` {unet}                               diffusion loss on the generator's (stopped) latent
``fidelity``       ``gen`` {unet (+ conv_in), vae enc.}         ``gen``: L_rec only (a fidelity teacher for CTSR)
``pisa``           ``pix`` {unet}, ``sem`` {unet}               steps < pisa.pixel_steps: ``pix`` on l2 MSE;
                                                                then ``sem`` on l2 MSE + LPIPS + l_csd CSD
``ctsr`` stage 1   ``student`` {unet (+ conv_in), vae enc.}      ``student``: L_rec + dual-teacher (L_fl, L_rn)
                   initialised from the realism teacher
``ctsr`` stage 2   ``control`` {unet}                           ``control``: the control-flow loss over t in [0, 1]
=================  ===========================================  ======================================================

The frozen tree passed to the jitted step holds the base parameters (``unet``, ``vae``), LPIPS, the negative-prompt
embedding and any frozen LoRAs (teachers, the stage-1 model). Batches arrive as ``hq``/``lq`` NHWC in [0, 1] and
prompt embeddings ``c`` [B, 77, D]; the losses work on [-1, 1].

Teachers for CTSR come from files (``ctsr.realism``, ``ctsr.fidelity``: an OSEDiff release ``.pkl``, a peft
file, or a folder written by jsr's export). With no file and the embedded tiny model (``model.path=""``), seeded
random non-zero LoRAs stand in for them (``Base.random_weights``), so the tiny configs and the benchmarks run end
to end without weights; with a real base model a missing teacher is an error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from jsr.models import lora as L
from jsr.sr import generator, losses
from jsr.sr.base import Base
from jsr.sr.teachers import UNetTeacher
from jsr.train.step import Update, make_optimizer

METHODS = ("osediff", "fidelity", "pisa", "ctsr")


@dataclasses.dataclass
class MethodSetup:
    """What the loop needs from a method.

    Attributes:
      params: ``{group: {model: LoRA}}`` initial trainable trees.
      phases: ``[(first_step, updates)]`` in step order; the step at ``first_step`` onwards runs ``updates``.
      frozen: the frozen (non-trained) tree of arrays for the jitted step.
      export_groups: groups written out as peft LoRAs at the end.
      preview: ``(params, frozen, lq [-1,1], c) -> sr [-1,1]`` for image summaries.
    """

    params: dict[str, dict[str, L.LoRA]]
    phases: list[tuple[int, list[Update]]]
    frozen: dict[str, Any]
    export_groups: tuple[str, ...]
    preview: Callable[..., jax.Array]

    @property
    def all_updates(self) -> list[Update]:
        seen, out = set(), []
        for _, ups in self.phases:
            for u in ups:
                if u.group not in seen:
                    seen.add(u.group)
                    out.append(u)
        return out

    def updates_at(self, step: int) -> tuple[int, list[Update]]:
        """Index and updates of the phase that step ``step`` (0-based) belongs to."""
        idx = 0
        for i, (first, _) in enumerate(self.phases):
            if step >= first:
                idx = i
        return idx, self.phases[idx][1]


def _optimizer(config) -> Any:
    o = config.optim
    return make_optimizer(o.lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                          warmup_steps=o.warmup_steps, total_steps=config.total_steps, schedule=o.schedule)


def _images(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return batch["lq"].astype(jnp.float32) * 2.0 - 1.0, batch["hq"].astype(jnp.float32) * 2.0 - 1.0


def _random_lora(rng: jax.Array, params: Any, spec: L.LoRASpec, std: float = 0.02) -> L.LoRA:
    """A LoRA with gaussian ``a`` and non-zero ``b`` (a stand-in teacher for runs without weights)."""
    lo = L.init(rng, params, spec)
    leaves, tree = jax.tree.flatten(lo.factors)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    leaves = [x if x.any() else std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dataclasses.replace(lo, factors=jax.tree.unflatten(tree, leaves))


def load_lora_set(path: str | Path, base: Base) -> dict[str, L.LoRA]:
    """``{"unet": LoRA, "vae": LoRA?}`` from an OSEDiff release file or a jsr export folder (``unet/``, ``vae/``)."""
    from jsr.weights.peft import load_peft_lora

    path = Path(path)
    params = {"unet": base.unet_params, "vae": base.vae_params}
    if path.is_dir() and (path / "unet").is_dir():
        out = {}
        for model in ("unet", "vae"):
            if (path / model).is_dir():
                loaded = load_peft_lora(path / model, params={"default": params[model]})
                out[model] = loaded["default"]
        return out
    loaded = load_peft_lora(path, params=params)
    if "unet" not in loaded:
        raise ValueError(f"{path}: expected an OSEDiff-style checkpoint with a UNet LoRA, found {sorted(loaded)}")
    return {k: v for k, v in loaded.items() if k in ("unet", "vae")}


def _teacher(config_path: str, base: Base, rng: jax.Array, name: str) -> dict[str, L.LoRA]:
    if config_path:
        logging.info("ctsr: %s teacher from %s", name, config_path)
        return load_lora_set(config_path, base)
    if not base.random_weights:
        raise ValueError(f"ctsr.{name} is empty: CTSR needs a {name} teacher LoRA (an OSEDiff release .pkl, a peft "
                         "file, or a jsr export folder); only random stand-in bases (the embedded tiny model, "
                         "`python -m jsr.weights write-tiny`) run with random teachers")
    logging.warning("ctsr: no %s teacher given; using a seeded random LoRA (random base only)", name)
    return {"unet": _random_lora(jax.random.fold_in(rng, 1), base.unet_params, L.OSEDIFF_UNET),
            "vae": _random_lora(jax.random.fold_in(rng, 2), base.vae_params, L.OSEDIFF_VAE)}


def _lpips_params(config, base: Base, rng: jax.Array) -> Any:
    from jsr.metrics.lpips import LPIPS, load_lpips_params
    from jsr.models.common import init_params

    paths = [p for p in (config.loss.lpips_vgg, config.loss.lpips_heads) if p]
    if paths:
        return load_lpips_params(*paths)
    if config.loss.lpips and not base.random_weights:
        raise ValueError("loss.lpips > 0 needs LPIPS weights: set loss.lpips_vgg=<vgg16-397923af.pth> and "
                         "loss.lpips_heads=<lpips weights/v0.1/vgg.pth> (or loss.lpips=0)")
    return init_params(LPIPS(), rng)  # random trunk: random-base runs only


def build(config, base: Base, rng: jax.Array) -> MethodSetup:
    """The :class:`MethodSetup` of ``config.method`` (``config.ctsr.stage`` picks CTSR's stage)."""
    m = base.models
    lw = config.loss
    frozen: dict[str, Any] = {"unet": base.unet_params, "vae": base.vae_params,
                              "c_neg": base.prompts.negative(config.negative_prompt)}
    if lw.lpips > 0 and not (config.method == "ctsr" and config.ctsr.stage == 2):  # stage 2 has no L_rec
        frozen["lpips"] = _lpips_params(config, base, jax.random.fold_in(rng, 7))

    def rec(x_sr, x_hq, frozen_, l2=lw.l2, lp=lw.lpips):
        fn = losses.lpips_loss_fn(frozen_["lpips"]) if lp else None
        return losses.reconstruction_loss(x_sr, x_hq, fn, l2_weight=l2, lpips_weight=lp)

    def net(frozen_, lora):
        return UNetTeacher(params=frozen_["unet"], lora=lora, schedule=m.schedule, unet=m.unet)

    opt = _optimizer(config)
    k_gen, k_fake, k_t = jax.random.split(rng, 3)

    def osediff_preview(params, frozen_, x_lq, c, group="gen"):
        return generator.osediff_restore(m, frozen_["unet"], frozen_["vae"], params[group]["unet"],
                                         params[group].get("vae"), x_lq, c)[0]

    if config.method in ("osediff", "fidelity"):
        params = {"gen": {"unet": L.init(k_gen, base.unet_params, L.OSEDIFF_UNET),
                          "vae": L.init(jax.random.fold_in(k_gen, 1), base.vae_params, L.OSEDIFF_VAE)}}
        use_vsd = config.method == "osediff" and lw.vsd > 0

        def gen_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_vsd = jax.random.split(rng_)
            x_lq, x_hq = _images(batch)
            g = params["gen"]
            x_sr, z_hat = generator.osediff_restore(m, frozen_["unet"], frozen_["vae"], g["unet"], g["vae"], x_lq,
                                                    batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            if use_vsd:
                vsd, p = losses.vsd_loss(z_hat, batch["c"], frozen_["c_neg"], k_vsd, real_eps=net(frozen_, None).eps,
                                         fake_eps=net(frozen_, params["fake"]["unet"]).eps, schedule=m.schedule,
                                         cfg_scale=lw.cfg_scale, t_min=lw.vsd_t_min, t_max=lw.vsd_t_max)
                total = total + lw.vsd * vsd
                parts = {**parts, **p}
            return total, (parts, {"z_hat": jax.lax.stop_gradient(z_hat)})

        updates = [Update("gen", gen_loss, opt)]
        if use_vsd:
            params["fake"] = {"unet": L.init(k_fake, base.unet_params, L.METHODS["osediff_fake_score"]["unet"])}

            def fake_loss(params, frozen_, batch, rng_, carry):
                loss, parts = losses.fake_score_loss(carry["z_hat"], batch["c"], rng_,
                                                     fake_output=net(frozen_, params["fake"]["unet"]).output,
                                                     schedule=m.schedule)
                return loss, (parts, carry)

            updates.append(Update("fake", fake_loss, _optimizer(config)))
        return MethodSetup(params=params, phases=[(0, updates)], frozen=frozen, export_groups=("gen",),
                           preview=osediff_preview)

    if config.method == "pisa":
        params = {"pix": {"unet": L.init(k_gen, base.unet_params, L.PISASR_UNET)},
                  "sem": {"unet": L.init(k_fake, base.unet_params, L.PISASR_UNET)}}

        def pix_loss(params, frozen_, batch, rng_, carry):
            x_lq, x_hq = _images(batch)
            x_sr, _ = generator.pisasr_restore(m, frozen_["unet"], frozen_["vae"], params["pix"]["unet"], None,
                                               x_lq, batch["c"], rng=rng_)
            total, parts = rec(x_sr, x_hq, frozen_, lp=0.0)
            return total, (parts, None)

        def sem_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_csd = jax.random.split(rng_)
            x_lq, x_hq = _images(batch)
            pix = jax.lax.stop_gradient(params["pix"]["unet"])
            x_sr, z_hat = generator.pisasr_restore(m, frozen_["unet"], frozen_["vae"], pix, params["sem"]["unet"],
                                                   x_lq, batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            csd, p = losses.csd_loss(z_hat, batch["c"], frozen_["c_neg"], k_csd, base_eps=net(frozen_, None).eps,
                                     schedule=m.schedule, cfg_scale=lw.cfg_scale, t_min=lw.csd_t_min,
                                     t_max=lw.csd_t_max)
            return total + lw.csd * csd, ({**parts, **p}, None)

        def pisa_preview(params, frozen_, x_lq, c):
            return generator.pisasr_restore(m, frozen_["unet"], frozen_["vae"], params["pix"]["unet"],
                                            params["sem"]["unet"], x_lq, c)[0]

        phases = [(0, [Update("pix", pix_loss, opt)]),
                  (int(config.pisa.pixel_steps), [Update("sem", sem_loss, _optimizer(config))])]
        return MethodSetup(params=params, phases=phases, frozen=frozen, export_groups=("pix", "sem"),
                           preview=pisa_preview)

    if config.method == "ctsr" and config.ctsr.stage == 1:
        realism = _teacher(config.ctsr.realism, base, jax.random.fold_in(k_t, 1), "realism")
        fidelity = _teacher(config.ctsr.fidelity, base, jax.random.fold_in(k_t, 2), "fidelity")
        frozen["teachers"] = {"realism": realism["unet"], "fidelity": fidelity["unet"]}
        vae_init = realism.get("vae") or L.init(k_gen, base.vae_params, L.OSEDIFF_VAE)
        # Alg. 1: the student starts as the realism teacher (a copy: its trees are trained, the teacher's not).
        params = {"student": {"unet": jax.tree.map(jnp.array, realism["unet"]), "vae": jax.tree.map(jnp.array, vae_init)}}
        c1 = config.ctsr

        def s1_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_dual = jax.random.split(rng_)
            x_lq, x_hq = _images(batch)
            s = params["student"]
            x_sr, z0s = generator.osediff_restore(m, frozen_["unet"], frozen_["vae"], s["unet"], s["vae"], x_lq,
                                                  batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            z0 = jax.lax.stop_gradient(generator.encode(m, frozen_["vae"], x_hq))
            dual, p = losses.dual_teacher_loss(
                z0s, z0, batch["c"], k_dual, student_eps=net(frozen_, s["unet"]).eps,
                fidelity_eps=net(frozen_, frozen_["teachers"]["fidelity"]).eps,
                realism_eps=net(frozen_, frozen_["teachers"]["realism"]).eps, schedule=m.schedule,
                g_time=c1.g_time, fl_weight=c1.fl_weight, rn_weight=c1.rn_weight,
                t_min=c1.t_min, t_max=c1.t_max)
            return total + dual, ({**parts, **p}, None)

        return MethodSetup(params=params, phases=[(0, [Update("student", s1_loss, opt)])], frozen=frozen,
                           export_groups=("student",),
                           preview=lambda p, f, x, c: osediff_preview(p, f, x, c, group="student"))

    if config.method == "ctsr" and config.ctsr.stage == 2:
        if not config.ctsr.stage1:
            raise ValueError("ctsr stage 2 needs ctsr.stage1: the stage-1 export folder (<workdir>/export/student) "
                             "or an OSEDiff-style LoRA file")
        stage1 = load_lora_set(config.ctsr.stage1, base)
        frozen["stage1"] = stage1
        params = {"control": {"unet": L.init(k_gen, base.unet_params, L.METHODS["osediff_fake_score"]["unet"])}}
        c2 = config.ctsr

        def s2_loss(params, frozen_, batch, rng_, carry):
            x_lq, _ = _images(batch)
            s1 = frozen_["stage1"]
            z_lq = generator.encode(m, frozen_["vae"], x_lq, s1.get("vae"))
            z0 = jax.lax.stop_gradient(generator.osediff_latent(m, frozen_["unet"], s1["unet"], z_lq, batch["c"]))
            teacher = generator.ctsr_student(m, frozen_["unet"], s1["unet"], None)
            student = generator.ctsr_student(m, frozen_["unet"], s1["unet"], params["control"]["unet"])
            loss, parts = losses.control_loss(z0, batch["c"], rng_, teacher_eps=teacher.eps,
                                              student_eps=student.eps, t_scale=c2.t_scale)
            return loss, (parts, None)

        def s2_preview(params, frozen_, x_lq, c, t=0.5):
            s1 = frozen_["stage1"]
            return generator.ctsr_restore(m, frozen_["unet"], frozen_["vae"], s1["unet"], s1.get("vae"),
                                          params["control"]["unet"], x_lq, c, t, t_scale=c2.t_scale)[0]

        return MethodSetup(params=params, phases=[(0, [Update("control", s2_loss, opt)])], frozen=frozen,
                           export_groups=("control",), preview=s2_preview)

    raise ValueError(f"unknown method {config.method!r} (stage {config.get('ctsr', {}).get('stage')}); "
                     f"known: {METHODS} (ctsr.stage 1 or 2)")
