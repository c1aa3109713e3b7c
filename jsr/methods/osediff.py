"""OSEDiff (Wu et al. 2024) and its reconstruction-only twin, the fidelity teacher.

Generator (one step, ``jsr.sr.generator``): ``z_L = s E(x_LQ; L_vae)``, ``eps = U(z_L, 999, c; L_gen)``,
``z_hat = x0(z_L, eps, 999)``. Trainable groups: ``gen`` {UNet LoRA rank 4 + the full ``conv_in``, VAE-encoder
LoRA}; with VSD also ``fake`` {the fake score's UNet LoRA}, updated after the generator on its stopped latent.

=============  ===================================================================================================
``osediff``    ``gen``: L_rec + l_vsd VSD (t in [20, 980), CFG 7.5); ``fake``: the fake score's diffusion loss
``fidelity``   ``gen``: L_rec only (no VSD): a model close to the ground truth, CTSR's fidelity teacher
=============  ===================================================================================================

Inference trees: ``unet`` (the generator LoRA) and ``vae`` (its encoder LoRA). Knobs: FiDeSR's LFIM on the
implied residual ``z_L - z`` (:mod:`jsr.methods.lfim_knobs`; gains 0 by default: the plain OSEDiff output). The
release file is OSEDiff's ``osediff.pkl`` (``jsr.weights.peft`` reads it).
"""

from __future__ import annotations

import jax

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Method, TrainSetup, Update
from jsr.methods.lfim_knobs import ImageForLFIM, LFIM_KNOBS, apply_lfim
from jsr.models import lora as L
from jsr.sr import generator

# The fake score trains LoRA only (OSEDiff_reg): OSEDiff's targets, no fully trained conv_in.
FAKE_SCORE_UNET = L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=4, alpha=8.0)


class OSEDiff(ImageForLFIM, Method):  # LFIM's spatial gate reads the LQ pixels
    name = "osediff"
    label = "OSEDiff"
    roles = {"unet": "generator UNet LoRA (+ full conv_in)", "vae": "VAE-encoder LoRA"}
    knobs = LFIM_KNOBS
    use_vsd = True

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        z = generator.osediff_latent(models, unet_params, trees.get("unet"), z_lq, c)
        return apply_lfim(z, z_lq, None, x_lq, knobs)

    def inference_trees(self, params, frozen):
        return dict(params["gen"])

    def import_release(self, path, base):
        return None  # a peft-format read (jsr.methods.export) already takes OSEDiff's .pkl

    def setup(self, config, base, rng) -> TrainSetup:
        m = base.models
        lw = config.loss
        frozen = common.base_frozen(config, base, rng)
        rec = common.reconstruction(config)
        k_gen, k_fake, _ = jax.random.split(rng, 3)
        params = {"gen": {"unet": L.init(k_gen, base.unet_params, L.OSEDIFF_UNET),
                          "vae": L.init(jax.random.fold_in(k_gen, 1), base.vae_params, L.OSEDIFF_VAE)}}
        use_vsd = self.use_vsd and lw.vsd > 0

        def gen_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_vsd = jax.random.split(rng_)
            x_lq, x_hq = common.images(batch)
            g = params["gen"]
            x_sr, z_hat = generator.osediff_restore(m, frozen_["unet"], frozen_["vae"], g["unet"], g["vae"], x_lq,
                                                    batch["c"], rng=k_enc)
            total, parts = rec(x_sr, x_hq, frozen_)
            if use_vsd:
                vsd, p = common.vsd_term(m, frozen_, params["fake"]["unet"], z_hat, batch["c"], frozen_["c_neg"],
                                         k_vsd, lw)
                total = total + vsd
                parts = {**parts, **p}
            return total, (parts, {"z_hat": jax.lax.stop_gradient(z_hat)})

        updates = [Update("gen", gen_loss, common.optimizer(config))]
        if use_vsd:
            params["fake"] = {"unet": L.init(k_fake, base.unet_params, FAKE_SCORE_UNET)}
            updates.append(common.fake_score_update(m, config))
        # The fake score is a training device, not a result: only the generator is exported.
        return TrainSetup(params=params, phases=[(0, updates)], frozen=frozen,
                          export={"gen": {"unet": ExportEntry("unet"), "vae": ExportEntry("vae")}})


class Fidelity(OSEDiff):
    """The OSEDiff generator trained on L_rec alone: CTSR's fidelity teacher (``configs/fidelity.py``)."""

    name = "fidelity"
    label = "Fidelity"
    use_vsd = False


registry.register(OSEDiff)
registry.register(Fidelity)
