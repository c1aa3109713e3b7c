"""FiDeSR: PiSA-SR's residual generator at UNet timestep 1 with a latent residual refinement block (LRRB), trained
with detail-aware weighting (DAW); latent frequency injection (LFIM) at inference.

Generator (one step, on the base VAE, no VAE LoRA): ``z_L = s E(x_LQ)``, ``eps_hat = U(z_L, 1, c; L)`` (the raw
UNet output, as PiSA-SR), ``r' = eps_hat + LRRB(concat[z_L, eps_hat])`` (:mod:`jsr.models.lrrb`),
``z = z_L - r'``, then LFIM on ``(z, z_L, r', x_LQ)`` (:mod:`jsr.methods.lfim_knobs`), ``x_SR = D(z / s)``.

Trainable trees, **one group** ``gen`` = {``unet``: a rank-8 UNet LoRA (alpha 8 = peft's default, gaussian init; the
targets are OSEDiff's/PiSA-SR's grep list, which FiDeSR's ``initialize_unet`` repeats: ``conv_in`` gets a LoRA, never
full training, since its checkpoint stores only ``lora`` tensors), ``lrrb``: the LRRB parameters}. One group because
the release trains both with one AdamW whose gradient clipping (``max_grad_norm``) is over all their parameters
together, and one loss: two groups would clip each separately and run the generator's forward and backward twice.

Loss per step (``train_fidesr.py``), images in [-1, 1]: ``x_SR`` from ``z_L`` sampled from the VAE posterior;
``L`` = LPIPS-VGG's spatial map of ``(x_SR, x_HQ)`` (:func:`jsr.metrics.lpips.lpips_spatial`, differentiable);
``w`` = the DAW weight (:func:`jsr.sr.daw.daw_weight`: no gradient, exactly 1 before ``fidesr.daw_warmup`` steps,
then ramped in over ``fidesr.daw_ramp`` steps to ``fidesr.daw_alpha``), from the step number the train step puts in
the batch (``batch["step"]``)::

    loss = l2 mean(w (x_SR - x_HQ)^2) + lpips mean(w L) + csd CSD_w(z)

``CSD_w`` is PiSA-SR's CSD (frozen base, CFG 7.5, ``t ~ U[20, 500)``) with the release's ``+ 1e-6`` on its
per-sample weight and ``w`` resized to the latent grid multiplying each element (``jsr.sr.losses.csd_loss``'s
``weight_map``/``w_eps``). Weights ``config.loss`` (l2 1, lpips 2, csd 1), lr 5e-5 (``configs/fidesr.py``: also
the null-prompt ratio 0.5 the loop applies). Differences from the release: the loop drops prompts per sample (the
release drops the whole batch's with probability 0.5) and CSD reads the batch's prompts after the drop (the release
gives CSD the undropped captions); without LPIPS weights (``loss.lpips = 0``) the DAW error map's LPIPS term is 0.

Export: ``gen/unet`` a peft LoRA (role ``unet``), ``gen/lrrb`` a module (``model.safetensors`` in the release's
``lrrb_state_dict`` names and layouts + ``config.json`` = :class:`jsr.models.lrrb.LRRBConfig`; role ``lrrb``).
The LRRB's sizes are read from its parameter shapes at inference; its residual scale is the release's fixed 0.2
(the release's checkpoint does not store it either).

Release file (``import_release``): FiDeSR's ``torch.save`` dict (``lora_rank_unet``, ``unet_lora_{encoder,decoder,
others}_modules``, ``state_dict_unet`` with peft names and the adapters ``default_encoder/decoder/others``,
``lrrb_state_dict``), read by :func:`jsr.weights.peft.load_release`. Run it with ``--lfim_radius released`` to
reproduce the release's LFIM filters exactly.

Knobs: LFIM's (:data:`jsr.methods.lfim_knobs.LFIM_KNOBS`), with FiDeSR's gains at the release's 0.2 / 0.3 unless
set (the shared knobs' declared default is 0, which keeps the other methods' outputs unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Method, TrainSetup, Update
from jsr.methods.lfim_knobs import ImageForLFIM, LFIM_KNOBS, RELEASE_GAINS, apply_lfim
from jsr.models import lora as L
from jsr.models.common import abstract_params
from jsr.models.lrrb import LRRB, LRRBConfig, init_lrrb_params, lrrb_from_torch, lrrb_refine
from jsr.sr import daw, generator, losses
from jsr.sr.teachers import UNetTeacher

# FiDeSR's UNet LoRA: PiSA-SR's targets (the same grep list), rank 8, peft's default alpha 8, nothing trained in full.
FIDESR_UNET = L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=8, alpha=8.0)
CSD_W_EPS = 1e-6  # fidesr.py, CSDLoss.cal_csd: weighting_factor = mean|z - x_real| + 1e-6
RELEASE_KEY = "lrrb_state_dict"


def lrrb_config_of(params: Mapping[str, Any], res_scale: float = 0.2) -> LRRBConfig:
    """The :class:`LRRBConfig` of LRRB parameters, from their shapes (``res_scale`` is not in the weights)."""
    k_in = params["in_conv"]["kernel"]  # [1, 1, in, mid]
    return LRRBConfig(in_channels=int(k_in.shape[2]), mid_channels=int(k_in.shape[3]),
                      growth=int(params["db1"]["conv1"]["kernel"].shape[3]), res_scale=res_scale)


def fidesr_latent(models: generator.SDModels, unet_params: Any, lora: L.LoRA | None, lrrb: Mapping | None,
                  z_lq: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FiDeSR's step without LFIM: ``(z = z_L - r', r')`` with ``r' = eps_hat + LRRB([z_L, eps_hat])`` and
    ``eps_hat`` the raw UNet output at timestep 1 ([B, h, w, 4] float32 both). ``lrrb=None``: ``r' = eps_hat``."""
    z_lq = z_lq.astype(jnp.float32)
    t = jnp.full((z_lq.shape[0],), generator.PISASR_TIMESTEP, jnp.float32)
    c = generator.broadcast_prompt(c, z_lq.shape[0])
    eps = UNetTeacher(params=unet_params, lora=lora, schedule=models.schedule, unet=models.unet).output(z_lq, t, c)
    r = eps if lrrb is None else lrrb_refine(lrrb, z_lq, eps, lrrb_config_of(lrrb))
    return z_lq - r, r


class FiDeSR(ImageForLFIM, Method):  # LFIM's spatial gate reads the LQ pixels
    name = "fidesr"
    label = "FiDeSR"
    roles = {"unet": "generator UNet LoRA (rank 8)", "lrrb": "latent residual refinement block (LRRB)"}
    required_roles = ("unet", "lrrb")
    knobs = LFIM_KNOBS

    def config(self):
        return ml_collections.ConfigDict(dict(
            lora_rank=FIDESR_UNET.rank, lora_alpha=FIDESR_UNET.alpha,
            lrrb_mid_channels=LRRBConfig.mid_channels, lrrb_growth=LRRBConfig.growth,
            # DAW (train_fidesr.sh): --alpha_daw_hf 0.6 --daw_warmup_offset 2000 --daw_ramp_steps 1000
            # --daw_wperc 0.5 --wmax_daw 2.0; alpha_daw_lf 0 and daw_lf_smooth 1 (training_utils.py defaults).
            daw_alpha=0.6, daw_alpha_lf=0.0, daw_warmup=2000, daw_ramp=1000, daw_p=0.5, daw_wmax=2.0,
            daw_lf_smooth=1))

    def knob_values(self, overrides=None):
        """Every knob's value, FiDeSR's LFIM gains defaulting to the release's 0.2 / 0.3."""
        return super().knob_values({**RELEASE_GAINS, **(overrides or {})})

    # -- inference -----------------------------------------------------------------------------------------------

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        z, r = fidesr_latent(models, unet_params, trees.get("unet"), trees.get("lrrb"), z_lq, c)
        return apply_lfim(z, z_lq, r, x_lq, knobs)

    def inference_trees(self, params, frozen):
        return dict(params["gen"])

    def module_template(self, role, config, base):
        if role != "lrrb":
            return super().module_template(role, config, base)
        return abstract_params(LRRB(LRRBConfig.from_dict(config)))

    def import_release(self, path, base):
        from jsr.weights import peft

        path = Path(path)
        if not common.pickle_mentions(path, RELEASE_KEY.encode()):
            return None
        loras, rest = peft.load_release(path, params={"unet": base.unet_params})
        if RELEASE_KEY not in rest:
            return None
        if set(loras) != {"unet"}:
            raise ValueError(f"{path}: a FiDeSR checkpoint holds one UNet LoRA (state_dict_unet), found "
                             f"{sorted(loras)}")
        lrrb = lrrb_from_torch(rest[RELEASE_KEY])
        latent = base.models.unet.config.in_channels
        if lrrb_config_of(lrrb).in_channels != 2 * latent:
            raise ValueError(f"{path}: the LRRB takes {lrrb_config_of(lrrb).in_channels} channels, but the base's "
                             f"latent has {latent} (want 2 x {latent}): a checkpoint for another base model")
        return {"unet": loras["unet"], "lrrb": lrrb}

    # -- training ------------------------------------------------------------------------------------------------

    def setup(self, config, base, rng) -> TrainSetup:
        from jsr.metrics.lpips import lpips_spatial

        m = base.models
        lw, fc = config.loss, config.fidesr
        frozen = common.base_frozen(config, base, rng)
        k_lora, k_lrrb = jax.random.split(jax.random.fold_in(rng, 11))
        spec = L.LoRASpec(FIDESR_UNET.targets, rank=int(fc.lora_rank), alpha=float(fc.lora_alpha))
        lcfg = LRRBConfig(in_channels=2 * m.unet.config.in_channels, mid_channels=int(fc.lrrb_mid_channels),
                          growth=int(fc.lrrb_growth))
        params = {"gen": {"unet": L.init(k_lora, base.unet_params, spec), "lrrb": init_lrrb_params(k_lrrb, lcfg)}}
        opts = daw.DAWOptions(alpha_hf=float(fc.daw_alpha), alpha_lf=float(fc.daw_alpha_lf),
                              warmup=int(fc.daw_warmup), ramp=int(fc.daw_ramp), p_perc=float(fc.daw_p),
                              wmax=float(fc.daw_wmax), lf_smooth=int(fc.daw_lf_smooth))

        def gen_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_csd = jax.random.split(rng_)
            x_lq, x_hq = common.images(batch)
            g = params["gen"]
            z_lq = generator.encode(m, frozen_["vae"], x_lq, None, rng=k_enc)
            z_hat, _ = fidesr_latent(m, frozen_["unet"], g["unet"], g["lrrb"], z_lq, batch["c"])
            x_sr = generator.decode(m, frozen_["vae"], z_hat)
            if lw.lpips:
                lp_map = lpips_spatial(frozen_["lpips"], x_sr * 0.5 + 0.5, x_hq * 0.5 + 0.5, precision=None)
            else:
                lp_map = jnp.zeros(x_sr.shape[:3] + (1,), jnp.float32)
            step = batch["step"]
            w = daw.daw_weight(x_sr, x_hq, lp_map, step, opts)  # [B, H, W, 1], mean 1, no gradient
            l2 = jnp.mean(w * jnp.square(x_sr - x_hq))
            lp = jnp.mean(w * lp_map)
            csd, p = losses.csd_loss(z_hat, batch["c"], frozen_["c_neg"], k_csd,
                                     base_eps=common.net(m, frozen_, None).eps, schedule=m.schedule,
                                     cfg_scale=lw.cfg_scale, t_min=lw.csd_t_min, t_max=lw.csd_t_max,
                                     weight_map=daw.resize_to_latent(w, z_hat.shape[1:3]), w_eps=CSD_W_EPS)
            total = lw.l2 * l2 + lw.lpips * lp + lw.csd * csd
            parts = {"l2": l2, "lpips": lp, "daw_alpha": daw.daw_ramp(step, opts.warmup, opts.ramp) * opts.alpha_hf,
                     "daw_w_max": jnp.max(w), **p}
            return total, (parts, None)

        return TrainSetup(params=params, phases=[(0, [Update("gen", gen_loss, common.optimizer(config))])],
                          frozen=frozen,
                          export={"gen": {"unet": ExportEntry("unet"), "lrrb": ExportEntry("lrrb", lcfg.to_dict())}})


registry.register(FiDeSR)
