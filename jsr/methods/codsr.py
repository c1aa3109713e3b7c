"""CODSR (Chen et al., CVPR 2026): one-step SR at a small timestep on the LQ latent, with LQ-guided feature
modulation, region-adaptive prior activation, a GAN stage and a text-matching stage.

Generator (one step; :func:`codsr_latent`), images NHWC in [-1, 1], latents scaled::

    z_L    = s E(x_LQ; L_vae)
    W      = region weight of x_LQ (jsr.sr.region_prior: Sobel-L1 patch means -> 0.3 .. 1, 2 x 2 latents a patch)
    eps_a  = W n,  n ~ N(0, I);   z_t = sqrt(abar_t) z_L + sqrt(1 - abar_t) eps_a;   k = sqrt(1 - abar_t) / sqrt(abar_t)
    eps^   = U(z_t, t, c; L_unet [+ L_align], conv_in -> h (1 + s / k) + b / k),  (s, b) = SFT(x_LQ) (jsr.models.sft)
    z_hat  = z_L + k (eps_a - eps^)          (= x0(z_t, eps^, t)),   x_SR = D(z_hat / s)

``t`` is uniform on the integers [50, 250] in training and 100 at inference (knob ``codsr_t``). A v-prediction base
has its output turned into ``eps^`` through the schedule. Inference draws ``n`` from the knob ``seed`` (default 0):
one noise field of the latent's shape shared by every image of a batch, so a restoration is reproducible and does
not depend on what else is in the batch; an image larger than ``--latent_tile`` draws it per tile (still seeded,
but no longer the whole-image field). The VAE encodes with the posterior mean (the release samples it).

==========  ============================================================  ======================================
stage       trainable groups                                              loss per step
==========  ============================================================  ======================================
1           ``gen`` {UNet LoRA rank 16 (OSEDiff's targets, alpha 8, no    L2 + 2 LPIPS; from ``gan_start``
            full conv_in), VAE-encoder LoRA rank 4, the SFT}; from          (3,000) + 0.2 G; ``disc``: 0.2 x the
            ``gan_start`` also ``disc`` {the discriminator heads}           discriminator loss on (x_HQ, sg x_SR)
2           ``align`` {a rank-16 LoRA on the ``attn2`` projections only}   L2 + 2 LPIPS + 2 VSD + 0.5 token/area
            over the frozen stage-1 model; ``fake`` {VSD fake score}       + 0.025 pixel BCE on noun masks
==========  ============================================================  ======================================

One ``gen`` group because the release trains LoRAs and SFT with one AdamW (one gradient clipping over all of them).
The discriminator (``jsr.models.vision_disc``) reads several layers of a frozen ViT (``codsr.disc_backbone``: a
transformers CLIP vision folder or a ``vit`` one such as DINO's, told apart by its ``config.json``; a random CLIP
stand-in on random bases) through small conv heads; its own AdamW is the second update of the step (on the
generator's stopped output, carried from the first). Loss kind
``codsr.gan_loss``: ``hinge`` (default) or ``nonsat`` (the release's ``multilevel_sigmoid_s``); the release
weighs both the generator's and the discriminator's loss by 0.2, and so does this.

Exports: stage 1 ``gen/unet`` + ``gen/vae`` (peft LoRAs) + ``gen/sft`` (``model.safetensors`` in the release's
``state_dict_sft`` names + ``config.json`` = :class:`jsr.models.sft.SFTConfig`); stage 2 ``align/unet`` (role
``align``), requiring the stage-1 export.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.models import lora as L
from jsr.models.common import abstract_params
from jsr.models.sft import LQSFT, SFTConfig, init_sft_params, sft_config_of, sft_from_torch, sft_modulation
from jsr.sr import gan, generator
from jsr.sr import region_prior as rp
from jsr.sr import schedule as sched

RELEASE_KEY = "state_dict_sft"  # only CODSR's checkpoints have it
_STAGE2_LIST = re.compile(r"unet_lora_(encoder|decoder|others)_modules_(default|sam)")
TRAIN_T = (50, 250)  # inclusive (torch.randint(50, 251))
INFER_T = 100
# A small random CLIP vision tower for random bases (tiny configs, tests): 4 layers, a 4 x 4 token grid.
STANDIN_BACKBONE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        image_size=32, patch_size=8)


def unet_spec(cc: Any) -> L.LoRASpec:
    """Stage 1's UNet LoRA: OSEDiff's targets (``conv_in`` as a LoRA, never trained in full), ``codsr.lora_rank``."""
    return L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=int(cc.lora_rank), alpha=float(cc.lora_alpha))


def align_spec(cc: Any) -> L.LoRASpec:
    """Stage 2's alignment LoRA: the cross-attention projections only (``attn2.to_q/to_k/to_v/to_out.0``), the
    layers the release trains of its ``*_alignment`` adapters (their other layers keep B = 0)."""
    return L.LoRASpec(L.Targets(patterns=L.UNET_PATTERNS, within=("attn2",)), rank=int(cc.align_rank),
                      alpha=float(cc.align_alpha))


def vae_spec(cc: Any) -> L.LoRASpec:
    """Stage 1's VAE-encoder LoRA: OSEDiff's encoder targets + ``quant_conv``, ``codsr.vae_rank``."""
    return L.LoRASpec(L.OSEDIFF_VAE_TARGETS, rank=int(cc.vae_rank), alpha=float(cc.vae_alpha))


def codsr_latent(models: generator.SDModels, unet_params: Any, lora: L.LoRA | None, sft: Mapping | None,
                 z_lq: jax.Array, x_lq: jax.Array, c: jax.Array, t: jax.Array, noise: jax.Array, *,
                 capture: tuple[str, ...] | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """CODSR's step in latent space (see the module docstring).

    Args:
      z_lq: scaled LQ latents [B, h, w, 4]; x_lq: the LQ pixels under them [B, 8h, 8w, 3] in [-1, 1].
      lora: the UNet LoRA (stage 1, or stage 1 stacked with the alignment LoRA); sft: SFT parameters or None.
      c: prompt embeddings [1 or B, L, D]; t: timesteps, scalar or [B] (integers, float or int dtype).
      noise: standard normal [B, h, w, 4] (or broadcastable), before the region weighting.
      capture: ``attn2`` layer-name patterns whose head-averaged cross-attention probabilities to return.
    Returns:
      ``(z_hat [B, h, w, 4] float32, aux)``, ``aux`` = ``{"eps_a", "weight", "k", "maps"}`` (``maps``: the
      captured ``{layer name: [B, h_l w_l, L]}``, empty without ``capture``).
    """
    b = z_lq.shape[0]
    s = models.schedule
    z_lq = z_lq.astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    k = rp.timestep_coeff(s, t)
    weight = rp.region_weight(x_lq, z_lq.shape[1:3])
    z_t, eps_a = rp.activate(s, z_lq, jnp.broadcast_to(noise, z_lq.shape), weight, t)
    mod = None if sft is None else sft_modulation(sft, x_lq, k)
    c = generator.broadcast_prompt(c, b)
    variables = L.variables(unet_params, lora)
    maps: dict[str, jax.Array] = {}
    if capture:
        from jsr.models.unet import attention_maps

        out, state = models.unet.apply(variables, z_t, t, c, conv_in_modulation=mod, capture_attention=capture,
                                       mutable=["attention_maps"])
        maps = attention_maps(state)
    else:
        out = models.unet.apply(variables, z_t, t, c, conv_in_modulation=mod)
    eps_hat = sched.eps_from_output(s, z_t, out, t)
    z_hat = rp.denoise(z_lq, eps_a, eps_hat, k)
    return z_hat, {"eps_a": eps_a, "weight": weight, "k": k, "maps": maps}


def inference_noise(seed: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
    """The seeded standard-normal field [h, w, C] of ``shape = (B, h, w, C)``, broadcast over the batch
    ([B, h, w, C] float32): every image of a batch gets the same field, so its output does not depend on the
    batch it is in."""
    n = jax.random.normal(jax.random.key(jnp.asarray(seed, jnp.uint32)), tuple(shape[1:]), jnp.float32)
    return jnp.broadcast_to(n, tuple(shape))


CLIP_TYPES = ("clip_vision_model", "clip")
VIT_TYPES = ("vit", "dinov2", "dinov2_with_registers")  # DINOv2 reaches the ViT config, which says it is unsupported


def load_disc_backbone(folder: str, dtype: Any):
    """``(module, params, normalization)`` of the discriminator's backbone from a transformers folder, by its
    ``config.json``'s ``model_type``: a CLIP vision tower (``clip_vision_model`` / ``clip``) or a ViT (``vit``,
    e.g. DINO ``facebook/dino-vitb16``). ``normalization`` is the (mean, std) of [0, 1] pixels from the folder's
    ``preprocessor_config.json``, else the family's (CLIP's, ImageNet's).

    Raises:
      ValueError for another model type (one line naming it and what is accepted).
    """
    from jsr.models.vision_disc import default_normalization
    from jsr.weights import io
    from jsr.weights.preprocessor import read_normalization

    model_type = io.read_config(folder).get("model_type")
    if model_type in CLIP_TYPES:
        from jsr.weights import load_clip_vision

        module, params = load_clip_vision(folder, dtype=dtype)
    elif model_type in VIT_TYPES:
        from jsr.weights.vit import load_vit

        module, params = load_vit(folder, dtype=dtype)
    else:
        raise ValueError(f"codsr.disc_backbone={folder}: model_type={model_type!r}; the discriminator takes a "
                         f"transformers CLIP vision folder (model_type {' / '.join(CLIP_TYPES)}, e.g. "
                         "clip-vit-base-patch16) or a ViT folder (model_type 'vit', e.g. facebook/dino-vitb16)")
    norm, source = read_normalization(folder, default_normalization(module))
    logging.info("discriminator backbone: %s (%s), pixel mean/std from %s", folder, type(module).__name__, source)
    return module, params, norm


def _backbone(cc: Any, base: Any, rng: jax.Array, dtype: Any):
    """``(module, params, layers, normalization)`` of the discriminator's frozen ViT (CLIP vision or DINO)."""
    from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
    from jsr.models.common import init_params
    from jsr.models.vision_disc import default_layers, default_normalization

    if cc.disc_backbone:
        module, params, norm = load_disc_backbone(cc.disc_backbone, dtype)
    elif base.random_weights:
        logging.warning("codsr.disc_backbone is empty: a random CLIP vision stand-in (random base only)")
        module = CLIPVisionModel(CLIPVisionConfig(**STANDIN_BACKBONE), dtype=dtype)
        params = init_params(module, rng)
        norm = default_normalization(module)
    else:
        raise ValueError("codsr.disc_backbone is empty: the GAN stage needs a pretrained ViT for its "
                         "discriminator (a transformers CLIP vision folder, e.g. clip-vit-base-patch16, or a DINO "
                         "ViT folder, e.g. facebook/dino-vitb16), or set codsr.gan_weight=0")
    layers = tuple(int(i) for i in cc.disc_layers) or default_layers(module.config.num_hidden_layers)
    return module, params, layers, norm


def release_trees(obj: Mapping[str, Any], file: str | Path, base: Any) -> dict[str, Any]:
    """``{role: tree}`` of a CODSR release dict (:func:`jsr.weights.peft.read_release`).

    Two layouts. Stage 1 (``CODSR_gen_Stage1.save_model``): OSEDiff's (``unet_lora_<g>_modules``, adapters
    ``default_<g>``, ``rank_unet``; ``vae_lora_encoder_modules``, ``state_dict_vae``, ``rank_vae``) plus
    ``state_dict_sft``. Stage 2 (the public ``codsr.pkl``, ``CODSR_gen_Stage2.save_model``): the stage-1 adapters'
    lists renamed ``unet_lora_<g>_modules_default``, the alignment adapters ``default_<g>_alignment`` listed in
    ``unet_lora_<g>_modules_sam`` (the same targets, one rank ``rank_unet``), and ``state_dict_unet`` also holding
    ``conv_in``/``conv_out``'s ``base_layer`` tensors. As the release's loader (``CODSR_test.load_ckpt``) does,
    only ``lora`` tensors are read (the ``base_layer`` ones are the frozen base's). peft's default alpha 8 applies
    to every adapter. Roles: ``unet`` (stage 1), ``align`` (stage 2, when present), ``vae``, ``sft``; at inference
    the two UNet LoRAs act together, the same as the release's merge of the first and then the second.
    """
    from jsr.weights import peft

    obj = dict(obj)
    sft_state = obj.pop(RELEASE_KEY)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        m = _STAGE2_LIST.fullmatch(str(key))
        if m:  # the alignment adapters become the "unet_alignment" LoRA (peft's naming of default_<g>_alignment)
            key = f"unet_lora_{m[1]}_modules" + ("_alignment" if m[2] == "sam" else "")
        out[key] = value
    if "state_dict_unet" in out:
        dropped = sorted(k for k in out["state_dict_unet"] if "lora" not in k)
        if dropped:
            logging.info("%s: ignoring %d non-LoRA UNet tensors (%s...), as the release's loader does", file,
                         len(dropped), dropped[0])
        out["state_dict_unet"] = {k: v for k, v in out["state_dict_unet"].items() if "lora" in k}
    loras = peft.release_loras(out, file, params={"unet": base.unet_params, "vae": base.vae_params})
    unknown = sorted(set(loras) - {"unet", "unet_alignment", "vae"})
    if "unet" not in loras or unknown:
        raise ValueError(f"{file}: a CODSR checkpoint holds the UNet LoRA default_<g> (+ default_<g>_alignment) and "
                         f"a VAE LoRA; found {sorted(loras)}")
    sft = sft_from_torch(sft_state)
    cfg = sft_config_of(sft)
    m = base.models
    want = (int(m.unet.config.block_out_channels[0]), 2 ** (len(m.vae.config.block_out_channels) - 1))
    if (cfg.channels, cfg.factor) != want:
        raise ValueError(f"{file}: the SFT outputs {cfg.channels} channels from {cfg.factor}x{cfg.factor} pixel "
                         f"blocks, but the base's UNet starts with {want[0]} channels on a /{want[1]} latent: a "
                         "checkpoint for another base model")
    roles = {"unet": loras["unet"], "sft": sft}
    if "vae" in loras:
        roles["vae"] = loras["vae"]
    if "unet_alignment" in loras:
        roles["align"] = loras["unet_alignment"]
    return roles


class CODSR(Method):
    name = "codsr"
    label = "CODSR"
    roles = {"unet": "stage-1 UNet LoRA (rank 16)", "vae": "stage-1 VAE-encoder LoRA",
             "sft": "LQ-guided SFT modulation (a module)", "align": "stage-2 text-matching LoRA (attn2)"}
    required_roles = ("unet", "sft")
    knobs = (
        Knob("codsr_t", int, INFER_T, "CODSR: UNet timestep of the one step (trained on 50..250; larger = more "
             "noise on the LQ latent)", min=1, max=999),
        Knob("seed", int, 0, "seed of the noise a stochastic one-step method adds (CODSR)", min=0,
             max=2 ** 31 - 1),
    )
    uses_image = True  # the SFT and the region weight read the LQ pixels

    def config(self):
        return ml_collections.ConfigDict(dict(
            stage=1,
            lora_rank=16, lora_alpha=8.0, vae_rank=4, vae_alpha=8.0,  # peft's default alpha 8, as released
            t_min=TRAIN_T[0], t_max=TRAIN_T[1],
            # GAN (stage 1): weight 0.2 from step 3,000 (train_codsr_stage1.py: warm_up_steps, lambda_gan).
            gan_weight=0.2, gan_start=3000, gan_loss="hinge", disc_backbone="", disc_layers=(), disc_hidden=256,
            # Stage 2.
            stage1="", align_rank=16, align_alpha=8.0, fake_rank=4, fake_alpha=8.0,
            match_layers=("down_blocks.0.attentions.0.transformer_blocks.0.attn2",), area_weight=0.5,
            bce_weight=0.025, max_noun_tokens=4))

    # -- inference -----------------------------------------------------------------------------------------------

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        if x_lq is None:
            raise ValueError("CODSR's step needs the LQ image (x_lq) under the latent")
        lora = trees.get("unet")
        if trees.get("align") is not None:
            lora = trees["align"] if lora is None else L.stack([(lora, 1.0), (trees["align"], 1.0)], unet_params)
        noise = inference_noise(knobs["seed"], z_lq.shape)
        z, _ = codsr_latent(models, unet_params, lora, trees.get("sft"), z_lq, x_lq, c, knobs["codsr_t"], noise)
        return z

    def inference_trees(self, params, frozen):
        if "gen" in params:
            return dict(params["gen"])
        return {**frozen["stage1"], "align": params["align"]["unet"]}

    def import_release(self, path, base):
        from jsr.weights import peft

        if not common.pickle_mentions(path, RELEASE_KEY.encode()):
            return None
        return release_trees(peft.read_release(path), path, base)

    def module_template(self, role, config, base):
        if role != "sft":
            return super().module_template(role, config, base)
        return abstract_params(LQSFT(SFTConfig.from_dict(config)))

    # -- training ------------------------------------------------------------------------------------------------

    def setup(self, config, base, rng) -> TrainSetup:
        stage = config.codsr.stage
        if stage == 1:
            return self._stage1(config, base, rng)
        if stage == 2:
            return self._stage2(config, base, rng)
        raise ValueError(f"codsr.stage must be 1 or 2, got {stage!r}")

    def _stage1(self, config, base, rng) -> TrainSetup:
        from jsr.models.vision_disc import discriminator_logits, init_heads_params

        m = base.models
        cc = config.codsr
        if cc.gan_loss not in gan.KINDS:
            raise ValueError(f"codsr.gan_loss={cc.gan_loss!r}: expected one of {gan.KINDS}")
        frozen = common.base_frozen(config, base, rng)
        rec = common.reconstruction(config)
        k_u, k_v, k_s, k_b, k_h = jax.random.split(jax.random.fold_in(rng, 17), 5)
        sft_cfg = SFTConfig(channels=int(m.unet.config.block_out_channels[0]),
                            factor=2 ** (len(m.vae.config.block_out_channels) - 1))
        params = {"gen": {"unet": L.init(k_u, base.unet_params, unet_spec(cc)),
                          "vae": L.init(k_v, base.vae_params, vae_spec(cc)),
                          "sft": init_sft_params(k_s, sft_cfg)}}
        use_gan = cc.gan_weight > 0 and cc.gan_start < config.total_steps
        t_lo, t_hi = int(cc.t_min), int(cc.t_max)
        w_gan = float(cc.gan_weight)
        frozen_axes = {}
        if use_gan:
            from jsr.models.common import logical_axes

            backbone, bparams, layers, norm = _backbone(cc, base, k_b, jnp.dtype(config.model.dtype))
            frozen["disc_backbone"] = bparams
            # The frozen ViT is sharded like the base (fsdp/tensor rules); the heads, trainable, are replicated
            # with every other trainable tree.
            frozen_axes["disc_backbone"] = logical_axes(backbone)
            params["disc"] = {"heads": init_heads_params(k_h, backbone.config, layers, int(cc.disc_hidden))}
            disc = functools.partial(discriminator_logits, backbone, layers=layers, hidden=int(cc.disc_hidden),
                                     normalization=norm)

        def gen_loss(params, frozen_, batch, rng_, carry, adversarial: bool):
            k_enc, k_t, k_n = jax.random.split(rng_, 3)
            x_lq, x_hq = common.images(batch)
            g = params["gen"]
            z_lq = generator.encode(m, frozen_["vae"], x_lq, g["vae"], rng=k_enc)
            t = jax.random.randint(k_t, (z_lq.shape[0],), t_lo, t_hi + 1)
            noise = jax.random.normal(k_n, z_lq.shape, jnp.float32)
            z_hat, aux = codsr_latent(m, frozen_["unet"], g["unet"], g["sft"], z_lq, x_lq, batch["c"], t, noise)
            x_sr = generator.decode(m, frozen_["vae"], z_hat)
            total, parts = rec(x_sr, x_hq, frozen_)
            parts = {**parts, "t": jnp.mean(t.astype(jnp.float32)), "noise_weight": jnp.mean(aux["weight"])}
            if adversarial:
                g_adv = gan.generator_loss(disc(frozen_["disc_backbone"], params["disc"]["heads"], x_sr), cc.gan_loss)
                total = total + w_gan * g_adv
                parts["gan_g"] = g_adv
            return total, (parts, {"x_sr": jax.lax.stop_gradient(x_sr)})

        def disc_loss(params, frozen_, batch, rng_, carry):
            _, x_hq = common.images(batch)
            heads = params["disc"]["heads"]
            real = disc(frozen_["disc_backbone"], heads, x_hq)
            fake = disc(frozen_["disc_backbone"], heads, carry["x_sr"])
            loss = gan.discriminator_loss(real, fake, cc.gan_loss)
            parts = {"gan_d": loss, "real_logit": jnp.mean(jnp.stack([jnp.mean(r) for r in real])),
                     "fake_logit": jnp.mean(jnp.stack([jnp.mean(f) for f in fake]))}
            return w_gan * loss, (parts, carry)

        opt = common.optimizer(config)
        plain = [Update("gen", functools.partial(gen_loss, adversarial=False), opt)]
        phases = [(0, plain)]
        if use_gan:
            adv = [Update("gen", functools.partial(gen_loss, adversarial=True), opt),
                   Update("disc", disc_loss, common.optimizer(config))]
            phases = [(0, adv)] if cc.gan_start <= 0 else [(0, plain), (int(cc.gan_start), adv)]
        # The discriminator is a training device, not a result: only the generator's trees are exported.
        return TrainSetup(params=params, phases=phases, frozen=frozen, frozen_axes=frozen_axes,
                          export={"gen": {"unet": ExportEntry("unet"), "vae": ExportEntry("vae"),
                                          "sft": ExportEntry("sft", sft_cfg.to_dict())}})

    def _stage1_trees(self, cc: Any, base: Any, rng: jax.Array) -> dict[str, Any]:
        """The frozen stage-1 model stage 2 builds on: ``{"unet", "vae", "sft"}`` from ``codsr.stage1`` (a stage-1
        export, or a CODSR release file), or seeded random stand-ins on a random base."""
        from jsr.methods.export import read_source

        if cc.stage1:
            logging.info("codsr stage 2 on the stage-1 model %s", cc.stage1)
            roles = dict(read_source(cc.stage1, base).roles)
            if "align" in roles:
                logging.warning("%s holds an alignment LoRA already; stage 2 trains a new one on its stage-1 trees",
                                cc.stage1)
                roles.pop("align")
            missing = [r for r in ("unet", "sft") if r not in roles]
            if missing:
                raise ValueError(f"codsr.stage1={cc.stage1}: a CODSR stage-1 model needs the {missing} tree(s) "
                                 f"(found {sorted(roles)}): give <stage-1 workdir>/export/gen or a CODSR .pkl")
            return roles
        if not base.random_weights:
            raise ValueError("codsr stage 2 needs codsr.stage1: the stage-1 export (<workdir>/export/gen) or a "
                             "CODSR release file")
        logging.warning("no codsr.stage1 given: seeded random stage-1 stand-ins (random base only)")
        k_u, k_v, k_s = jax.random.split(rng, 3)
        m = base.models
        sft = init_sft_params(k_s, SFTConfig(channels=int(m.unet.config.block_out_channels[0]),
                                             factor=2 ** (len(m.vae.config.block_out_channels) - 1)))
        leaves, tree = jax.tree.flatten(sft)  # non-zero second convs: a stand-in that modulates
        keys = jax.random.split(jax.random.fold_in(k_s, 1), len(leaves))
        sft = jax.tree.unflatten(tree, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
        return {"unet": common.random_lora(k_u, base.unet_params, unet_spec(cc)),
                "vae": common.random_lora(k_v, base.vae_params, vae_spec(cc)), "sft": sft}

    def _stage2(self, config, base, rng) -> TrainSetup:
        from jsr.sr import text_matching as tm

        m = base.models
        cc, lw = config.codsr, config.loss
        frozen = common.base_frozen(config, base, rng)
        k_s1, k_a, k_f = jax.random.split(jax.random.fold_in(rng, 19), 3)
        frozen["stage1"] = self._stage1_trees(cc, base, k_s1)
        params = {"align": {"unet": L.init(k_a, base.unet_params, align_spec(cc))}}
        rec = common.reconstruction(config)
        use_vsd = lw.vsd > 0
        if use_vsd:
            params["fake"] = {"unet": L.init(k_f, base.unet_params, L.LoRASpec(
                L.OSEDIFF_UNET_TARGETS, rank=int(cc.fake_rank), alpha=float(cc.fake_alpha)))}
        matching = cc.area_weight > 0 or cc.bce_weight > 0
        capture = tuple(cc.match_layers) if matching else None
        t_lo, t_hi = int(cc.t_min), int(cc.t_max)

        def gen_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_t, k_n, k_vsd = jax.random.split(rng_, 4)
            x_lq, x_hq = common.images(batch)
            s1 = frozen_["stage1"]
            z_lq = generator.encode(m, frozen_["vae"], x_lq, s1.get("vae"), rng=k_enc)
            lora = L.stack([(s1["unet"], 1.0), (params["align"]["unet"], 1.0)], frozen_["unet"])
            t = jax.random.randint(k_t, (z_lq.shape[0],), t_lo, t_hi + 1)
            noise = jax.random.normal(k_n, z_lq.shape, jnp.float32)
            use_maps = capture is not None and "masks" in batch
            z_hat, aux = codsr_latent(m, frozen_["unet"], lora, s1["sft"], z_lq, x_lq, batch["c"], t, noise,
                                      capture=capture if use_maps else None)
            x_sr = generator.decode(m, frozen_["vae"], z_hat)
            total, parts = rec(x_sr, x_hq, frozen_)
            if use_vsd:
                vsd, p = common.vsd_term(m, frozen_, params["fake"]["unet"], z_hat, batch["c"], frozen_["c_neg"],
                                         k_vsd, lw)
                total = total + vsd
                parts = {**parts, **p}
            if use_maps:
                size = x_hq.shape[1:3]
                maps = [tm.noun_maps(probs, batch["noun_tokens"], batch["noun_weights"], size)
                        for probs in aux["maps"].values()]
                tok, bce, n = tm.matching_losses(sum(maps) / len(maps), batch["masks"], batch["noun_weights"])
                total = total + cc.area_weight * tok + cc.bce_weight * bce
                parts = {**parts, "match_token": tok, "match_bce": bce, "match_nouns": n}
            return total, (parts, {"z_hat": jax.lax.stop_gradient(z_hat)})

        updates = [Update("align", gen_loss, common.optimizer(config))]
        if use_vsd:
            updates.append(common.fake_score_update(m, config))
        host = _NounTokens(base, int(cc.max_noun_tokens)) if matching else None
        requires = {r: str(cc.stage1) for r in ("unet", "vae", "sft")} if cc.stage1 else {}
        return TrainSetup(params=params, phases=[(0, updates)], frozen=frozen,
                          export={"align": {"unet": ExportEntry("align")}}, requires=requires, host_batch=host)


class _NounTokens:
    """The loop's host-side hook of stage 2: each batch's noun masks plus the nouns' token positions in the
    prompts the step trains on (``jsr.sr.text_matching.noun_token_table``). Images with no noun found in their
    prompt (no sidecar, a dropped prompt, nouns absent from the caption) train without the matching terms; they
    are counted and the count is logged."""

    LOG_EVERY = 100

    def __init__(self, base: Any, max_tokens: int):
        self._folder = base.path / "tokenizer"
        self._tok = None
        self.max_tokens = max_tokens
        self.images = self.unmatched = self.batches = 0

    def __call__(self, batch: Mapping[str, Any], prompts: list[str]) -> dict[str, Any]:
        import numpy as np

        from jsr.sr import text_matching as tm

        if "nouns" not in batch:
            if not self.batches:
                logging.warning("codsr stage 2: the data has no noun masks (data.noun_masks=False or a source "
                                "without files): training without the text-matching terms")
            self.batches += 1
            return {}
        if self._tok is None:
            from jsr.models.clip_text import Tokenizer

            self._tok = Tokenizer(self._folder)
        tokens, weights = tm.noun_token_table(self._tok, prompts, batch["nouns"], self.max_tokens)
        matched = weights.reshape(weights.shape[0], -1).sum(axis=1) > 0
        self.images += len(matched)
        self.unmatched += int((~matched).sum())
        self.batches += 1
        if self.batches == 1 or self.batches % self.LOG_EVERY == 0:
            logging.info("codsr stage 2: %d of %d images so far trained without text matching (no noun mask, or "
                         "no noun of its masks in its prompt)", self.unmatched, self.images)
        return {"masks": np.asarray(batch["masks"]), "noun_tokens": tokens, "noun_weights": weights}


registry.register(CODSR)
