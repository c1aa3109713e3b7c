"""PiSA-SR (Sun et al. 2025): a pixel LoRA (L2, first) then a semantic LoRA (L2 + LPIPS + CSD), residual at t = 1.

Generator (``jsr.sr.generator.pisasr_latent``) on the base VAE (no VAE LoRA): ``z_hat = z_L - eps`` with
``eps = lp eps_pix + ls (eps_pix+sem - eps_pix)``; ``lp = ls = 1`` is one UNet call with both LoRAs stacked.
Training phases: steps ``< pisasr.pixel_steps`` update ``pix`` on ``l2 MSE``; later steps update ``sem`` on
``l2 MSE + LPIPS + l_csd CSD`` (CSD: t in [20, 500), CFG 7.5, the frozen base only) with ``pix`` frozen.
Knobs: ``lambda_pix``, ``lambda_sem`` (PiSA-SR's adjustable inference) and FiDeSR's LFIM on the residual
``z_L - z`` (:mod:`jsr.methods.lfim_knobs`; gains 0 by default). Release file: ``pisa_sr.pkl``
(``unet_pix``/``unet_sem`` adapters; ``jsr.weights.peft`` reads it).
"""

from __future__ import annotations

import jax
import ml_collections

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.methods.lfim_knobs import ImageForLFIM, LFIM_KNOBS, apply_lfim
from jsr.models import lora as L
from jsr.sr import generator, losses


class PiSASR(ImageForLFIM, Method):  # LFIM's spatial gate reads the LQ pixels
    name = "pisasr"
    label = "PiSA-SR"
    roles = {"pix": "pixel-level UNet LoRA", "sem": "semantic-level UNet LoRA"}
    required_roles = ("pix",)
    knobs = (
        Knob("lambda_pix", float, 1.0, "PiSA-SR pixel guidance weight", min=0.0, max=10.0,
             needs_text="a PiSA-SR model"),
        Knob("lambda_sem", float, 1.0, "PiSA-SR semantic guidance weight", min=0.0, max=10.0, needs="sem",
             needs_text="a PiSA-SR semantic LoRA"),
    ) + LFIM_KNOBS

    def config(self):
        return ml_collections.ConfigDict(dict(pixel_steps=4000))

    def normalize_roles(self, roles):
        roles = dict(roles)
        if "unet" in roles:  # a plain UNet LoRA given with PiSA-SR's is its pixel LoRA
            if "pix" in roles:
                raise ValueError("pisasr: both a plain UNet LoRA and a pixel LoRA were given; pass one pixel LoRA")
            roles["pix"] = roles.pop("unet")
        return roles

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        return apply_lfim(self._latent(models, unet_params, trees, z_lq, c, knobs), z_lq, None, x_lq, knobs)

    def _latent(self, models, unet_params, trees, z_lq, c, knobs):
        pix, sem = trees.get("pix"), trees.get("sem")
        lp, ls = knobs["lambda_pix"], knobs["lambda_sem"]
        if sem is None:
            return generator.pisasr_latent(models, unet_params, pix, None, z_lq, c, lp, ls)
        # lp = ls = 1 (the default) is eps_pix+sem alone: one UNet call instead of two. The knobs are traced (a
        # slider never recompiles), so the choice is made at run time; both branches are compiled once.
        return jax.lax.cond(
            (lp == 1.0) & (ls == 1.0),
            lambda z: generator.pisasr_latent(models, unet_params, pix, sem, z, c, 1.0, 1.0),
            lambda z: generator.pisasr_latent(models, unet_params, pix, sem, z, c, lp, ls), z_lq)

    def inference_trees(self, params, frozen):
        return {"pix": params["pix"]["unet"], "sem": params["sem"]["unet"]}

    def setup(self, config, base, rng) -> TrainSetup:
        m = base.models
        lw = config.loss
        frozen = common.base_frozen(config, base, rng)
        rec = common.reconstruction(config)
        k_gen, k_fake, _ = jax.random.split(rng, 3)
        params = {"pix": {"unet": L.init(k_gen, base.unet_params, L.PISASR_UNET)},
                  "sem": {"unet": L.init(k_fake, base.unet_params, L.PISASR_UNET)}}

        def pix_loss(params, frozen_, batch, rng_, carry):
            x_lq, x_hq = common.images(batch)
            x_sr, _ = generator.pisasr_restore(m, frozen_["unet"], frozen_["vae"], params["pix"]["unet"], None,
                                               x_lq, batch["c"], rng=rng_)
            total, parts = rec(x_sr, x_hq, frozen_, lp=0.0)
            return total, (parts, None)

        def sem_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_csd = jax.random.split(rng_)
            x_lq, x_hq = common.images(batch)
            pix = jax.lax.stop_gradient(params["pix"]["unet"])
            x_sr, z_hat = generator.pisasr_restore(m, frozen_["unet"], frozen_["vae"], pix, params["sem"]["unet"],
                                                   x_lq, batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            csd, p = losses.csd_loss(z_hat, batch["c"], frozen_["c_neg"], k_csd,
                                     base_eps=common.net(m, frozen_, None).eps, schedule=m.schedule,
                                     cfg_scale=lw.cfg_scale, t_min=lw.csd_t_min, t_max=lw.csd_t_max)
            return total + lw.csd * csd, ({**parts, **p}, None)

        phases = [(0, [Update("pix", pix_loss, common.optimizer(config))]),
                  (int(config.pisasr.pixel_steps), [Update("sem", sem_loss, common.optimizer(config))])]
        return TrainSetup(params=params, phases=phases, frozen=frozen,
                          export={"pix": {"unet": ExportEntry("pix")}, "sem": {"unet": ExportEntry("sem")}})


registry.register(PiSASR)
