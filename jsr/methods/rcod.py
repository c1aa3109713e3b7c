"""RCOD (Realism Controlled One-step Diffusion, its OSEDiff-based variant RCOD-O): an OSEDiff generator whose UNet
timestep is a realism *code* picked per training sample from how degraded it is, visual prompts from a CLIP vision
encoder in place of text, and per-code VSD timestep ranges.

Generator (one step; images NHWC in [-1, 1], latents scaled)::

    ctx   = P(CLIP(pre(x_LQ)).last_hidden_state)      # [B, 257, D_cross] for ViT-L/14: the UNet's context
    z_L   = s E(x_LQ; L_vae)
    out   = U(z_L, code, ctx; L_gen)                   # code: a UNet timestep used as a control input
    z_hat = (z_L - sqrt(1 - a) out) / sqrt(a)          # a = 0.7537 for every code (v-prediction: sqrt(a) z_L - ...)

``P`` is a trainable ``Linear(D_clip, D_cross)`` (:func:`project`), CLIP the frozen vision tower
(:mod:`jsr.models.clip_vision`; ViT-L/14 in the release) and ``pre`` its preprocessing: ``"clip"`` (resize, centre
crop, CLIP mean/std; jsr's default) or ``"release"`` (RCOD's code: the [-1, 1] image squashed to 224 x 224 by a
bilinear antialiased resize, no normalisation; what its checkpoint was trained with).

**Latent grouping** (training). ``cos`` = the cosine similarity of the flattened LQ and HQ latents of each sample
(:func:`latent_cosine`; both encoded by the generator's LoRA'd VAE encoder, posterior samples, no gradient, as the
release does) picks the code (:func:`group_codes`): 3 groups ``cos < 0.5 -> 749``, ``0.5 <= cos < 0.7 -> 499``,
``cos >= 0.7 -> 249``; ``rcod.groups = 4`` adds ``cos < 0.3 -> 999``. The x0 step always uses the release's fixed
``alpha_bar = 0.7537`` (``rcod.abar``; SD-2.1's table has 0.7537 at t = 200 and 0.6754 at t = 249), so the code is a
pure control input. At inference the user picks it: knob ``rcod_code`` (default 249, fidelity; 499, 749 more
realism; any integer in [0, 999]: codes between the trained ones interpolate, which the paper does not study).

**Degradation-aware sampling** (:func:`vsd_timesteps`). Per sample, OSEDiff's VSD timestep is drawn from
``[20, 980)`` when its code is below 749 and from ``[200, 980)`` otherwise (CFG 7.5 for all; ``loss.vsd_t_min``,
``rcod.vsd_t_min_high``, ``loss.vsd_t_max``, ``rcod.vsd_split_code``).

Trainable trees: group ``gen`` = {``unet``: LoRA rank 4 + full ``conv_in`` (OSEDiff's), ``vae``: encoder LoRA,
``proj``: the projection (PyTorch ``nn.Linear``'s default init, U(+-1/sqrt(D_clip)))}; group ``fake``: the VSD fake
score's UNet LoRA (OSEDiff's), trained after the generator on its stopped latent. Loss ``l2 MSE + lpips LPIPS +
vsd VSD`` (1, 2, 1), lr 5e-5 (``configs/rcod.py``).

Readings of the release (``RCOD_O/rcod_o_model.py``, ``train_rcod_o.py``), and what differs here:

* VSD's prompts in the release are *text*: the real and fake scores see the text embedding of the HQ image's tags
  (RAM) and the text negative prompt; the visual prompt only conditions the generator. That is the default here
  (the batch's prompt and ``config.negative_prompt``). The release's generator also computes the visual context of
  an all-zero image (its "negative prompt") but never uses it; ``rcod.vsd_prompt = "visual"`` gives VSD the visual
  context and that zero-image negative (:func:`zero_image_context`) instead, both without gradient.
* The release's optimizer holds the UNet LoRA, ``conv_in`` and the VAE LoRA but *not* the projection, which thus
  keeps its random initialisation (and is saved as such in ``state_dict_proj``). The issue (#16) asks for a trainable
  projection: ``rcod.train_projection = True`` (default); ``False`` reproduces the release (its updates are masked).
* Inference encodes the LQ with the VAE posterior *mean* (the release samples it: a deterministic output here).
* The release's ``preprocess_image`` (224-px unfold crops) is never called; ``encode_prompt`` only resizes.
* Training previews (``jsr.train.loop``) use the knobs' defaults, so the ``clip`` preprocessing even for a run
  with ``rcod.preprocess = "release"``; the export records the run's preprocessing as the knob default.

Inference roles: ``unet``, ``vae``, ``proj`` and ``vision`` (a :class:`VisionTower`: a transformers CLIP vision
folder, ``--lora vision=PATH``; an export's manifest records the folder it was trained with). Export: ``gen/unet``,
``gen/vae`` (peft), ``gen/proj`` (``model.safetensors`` with the release's ``state_dict_proj`` names ``weight`` /
``bias``). Release file (:meth:`RCOD.import_release`): RCOD's ``torch.save`` dict, OSEDiff's keys plus
``state_dict_proj``; it sets ``rcod_preprocess = release``.

Knobs: ``rcod_code``, ``rcod_preprocess``, ``rcod_abar`` (the trained model's fixed alpha-bar, recorded in its
export) and LFIM's (:mod:`jsr.methods.lfim_knobs`, gains 0 by default: the plain RCOD output). The whole one-step
restoration as one function (the forward benchmark's unit): :func:`rcod_restore`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from jsr.methods import common, registry
from jsr.methods.api import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.methods.lfim_knobs import ImageForLFIM, LFIM_KNOBS, apply_lfim
from jsr.methods.osediff import FAKE_SCORE_UNET
from jsr.models import lora as L
from jsr.models.clip_vision import PREPROCESS_MODES, CLIPVisionConfig, CLIPVisionModel, clip_preprocess
from jsr.sr import generator
from jsr.sr.teachers import UNetTeacher

RELEASE_ABAR = 0.7537  # rcod_o_model.py: alpha_prod_t = 0.7537 for every code
DEFAULT_CODE = 249
# div_step: ascending cosine-similarity thresholds and the code of each bin (below the first ... above the last).
GROUP_THRESHOLDS = {3: (0.5, 0.7), 4: (0.3, 0.5, 0.7)}
GROUP_CODES = {3: (749, 499, 249), 4: (999, 749, 499, 249)}
VSD_SPLIT_CODE = 749  # time_step_group: codes below it draw VSD t from [20, 980), the others from [200, 980)
VSD_T_MIN_HIGH = 200
VSD_PROMPTS = ("text", "visual")
RELEASE_KEY = "state_dict_proj"
# openai/clip-vit-large-patch14's vision tower (the release's visual-prompt encoder), as a transformers config.
VIT_L14 = dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"], hidden_size=1024,
               intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14,
               projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


# ----------------------------------------------------------------------------------------------------------------
# The visual prompt


@struct.dataclass
class VisionTower:
    """A frozen CLIP vision encoder as one pytree: its parameters (leaves) and architecture (static), so it
    travels through ``jit`` as a tree role (``vision``) or a frozen entry.

    Attributes:
      params: the ``CLIPVisionModel`` parameters (:func:`jsr.weights.load_clip_vision`).
      config: its :class:`jsr.models.clip_vision.CLIPVisionConfig`.
    """

    params: Any
    config: CLIPVisionConfig = struct.field(pytree_node=False)

    def module(self, dtype: Any = jnp.float32) -> CLIPVisionModel:
        """The Flax module, computing in ``dtype``."""
        return CLIPVisionModel(self.config, dtype=dtype)


def vision_tokens(tower: VisionTower, x: jax.Array, mode: str = "clip", dtype: Any = jnp.float32) -> jax.Array:
    """CLIP's last hidden state of images ``x`` [B, H, W, 3] in [-1, 1]: [B, 1 + (S/p)^2, D_clip] float32
    (257 x 1024 for ViT-L/14), no gradient (the encoder is frozen). ``mode``: :func:`clip_preprocess`'s."""
    pixels = clip_preprocess((x.astype(jnp.float32) + 1.0) * 0.5, tower.config.image_size, mode)
    out = tower.module(dtype).apply({"params": tower.params}, pixels.astype(dtype))
    return jax.lax.stop_gradient(out.last_hidden_state.astype(jnp.float32))


def project(proj: Mapping[str, jax.Array], h: jax.Array) -> jax.Array:
    """The visual-prompt projection ``h @ kernel + bias``: [..., D_clip] -> [..., D_cross] float32."""
    return h.astype(jnp.float32) @ proj["kernel"].astype(jnp.float32) + proj["bias"].astype(jnp.float32)


def visual_context(tower: VisionTower, proj: Mapping[str, jax.Array], x: jax.Array, mode: str = "clip",
                   dtype: Any = jnp.float32) -> jax.Array:
    """RCOD's cross-attention context of LQ images ``x`` [B, H, W, 3] in [-1, 1]: ``P(CLIP(pre(x)))``,
    [B, N, D_cross] float32 (gradient flows into ``proj`` only)."""
    return project(proj, vision_tokens(tower, x, mode, dtype))


def zero_image_context(tower: VisionTower, proj: Mapping[str, jax.Array], mode: str = "clip",
                       dtype: Any = jnp.float32) -> jax.Array:
    """The visual context of an all-zero image in the model's [-1, 1] range (the release's
    ``encode_prompt(zeros_like(lq))``: mid-grey; any size gives the same tokens, since the resize keeps a
    constant image constant): [1, N, D_cross] float32. With ``mode="release"`` CLIP sees exact zeros."""
    s = tower.config.image_size
    return visual_context(tower, proj, jnp.zeros((1, s, s, 3), jnp.float32), mode, dtype)


def init_projection(rng: jax.Array, in_features: int, out_features: int) -> dict[str, jax.Array]:
    """PyTorch ``nn.Linear``'s default initialisation (kernel and bias uniform in +-1/sqrt(in_features)):
    ``{"kernel": [in, out], "bias": [out]}`` float32."""
    k_w, k_b = jax.random.split(rng)
    bound = 1.0 / float(in_features) ** 0.5
    return {"kernel": jax.random.uniform(k_w, (in_features, out_features), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (out_features,), jnp.float32, -bound, bound)}


def projection_from_torch(state: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A ``nn.Linear`` state dict (``weight`` [out, in], ``bias`` [out]; RCOD's ``state_dict_proj``) as
    :func:`project`'s tree (float32)."""
    missing = sorted({"weight", "bias"} - set(state))
    if missing or len(state) != 2:
        raise ValueError(f"{RELEASE_KEY}: want exactly a Linear's weight and bias, got keys {sorted(state)}")
    w = jnp.asarray(state["weight"], jnp.float32)
    return {"kernel": w.T, "bias": jnp.asarray(state["bias"], jnp.float32)}


def is_clip_vision_folder(path: str | Path) -> bool:
    """Whether ``path`` is a transformers CLIP vision (or full CLIP) folder: a ``config.json`` whose
    ``model_type`` is ``clip_vision_model`` or ``clip``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in ("clip_vision_model", "clip")
    except (OSError, ValueError, AttributeError):
        return False


def load_vision(path: str | Path, dtype: Any = jnp.float32) -> VisionTower:
    """A :class:`VisionTower` from a transformers CLIP vision / CLIP folder, parameters stored in ``dtype``."""
    from jsr.weights.clip_vision import load_clip_vision

    module, params = load_clip_vision(path, dtype=dtype)
    return VisionTower(params=params, config=module.config)


def init_vision_tower(rng: jax.Array, config: Mapping[str, Any] = VIT_L14, dtype: Any = jnp.float32) -> VisionTower:
    """A :class:`VisionTower` with random (Flax default) weights for a transformers vision ``config``
    (default ViT-L/14: the release's encoder at full size, for benchmarks and shape checks)."""
    from jsr.models.common import init_params

    cfg = CLIPVisionConfig.from_transformers(config, with_projection=False)
    params = init_params(CLIPVisionModel(cfg), rng)
    return VisionTower(params=jax.tree.map(lambda a: a.astype(dtype), params), config=cfg)


# ----------------------------------------------------------------------------------------------------------------
# Grouping, the fixed-abar step, VSD timesteps


def latent_cosine(z_a: jax.Array, z_b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Per-sample cosine similarity of two latent batches [B, ...] flattened: [B] float32 (each norm clamped at
    ``eps``, as PyTorch's ``F.cosine_similarity``)."""
    a = z_a.reshape(z_a.shape[0], -1).astype(jnp.float32)
    b = z_b.reshape(z_b.shape[0], -1).astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=1), eps)
    return jnp.sum(a * b, axis=1) / (na * nb)


def group_codes(cos: jax.Array, groups: int = 3) -> jax.Array:
    """RCOD's latent grouping: the timestep code of each sample's LQ-HQ cosine similarity ``cos`` [B]
    (3 groups: ``< 0.5 -> 749``, ``[0.5, 0.7) -> 499``, ``>= 0.7 -> 249``; 4 groups add ``< 0.3 -> 999``).
    Returns [B] float32 (UNet timesteps)."""
    if groups not in GROUP_THRESHOLDS:
        raise ValueError(f"rcod.groups={groups}: RCOD has 3 or 4 groups")
    th = jnp.asarray(GROUP_THRESHOLDS[groups], jnp.float32)
    codes = jnp.asarray(GROUP_CODES[groups], jnp.float32)
    # The number of thresholds at or below cos is the bin (a value on a threshold belongs to the upper bin).
    return codes[jnp.sum(cos.astype(jnp.float32)[:, None] >= th[None, :], axis=1)]


def fixed_abar_x0(z: jax.Array, out: jax.Array, abar: float | jax.Array = RELEASE_ABAR,
                  prediction_type: str = "epsilon") -> jax.Array:
    """The x0 step at a fixed ``alpha_bar`` whatever the UNet's timestep: ``(z - sqrt(1 - a) eps) / sqrt(a)``
    for an epsilon model, ``sqrt(a) z - sqrt(1 - a) v`` for a v-prediction one. [B, h, w, C] float32."""
    a = jnp.asarray(abar, jnp.float32)
    z, out = z.astype(jnp.float32), out.astype(jnp.float32)
    if prediction_type == "epsilon":
        return (z - jnp.sqrt(1.0 - a) * out) / jnp.sqrt(a)
    if prediction_type == "v_prediction":
        return jnp.sqrt(a) * z - jnp.sqrt(1.0 - a) * out
    raise ValueError(f"prediction_type {prediction_type!r}")


def vsd_timesteps(rng: jax.Array, codes: jax.Array, t_min: int = 20, t_min_high: int = VSD_T_MIN_HIGH,
                  t_max: int = 980, split: int = VSD_SPLIT_CODE) -> jax.Array:
    """Degradation-aware VSD timesteps: per sample an integer uniform in ``[t_min, t_max)`` when its code is
    below ``split``, else in ``[t_min_high, t_max)`` (as ``torch.randint``). ``codes`` [B] -> [B] float32."""
    lo = jnp.where(codes < split, t_min, t_min_high).astype(jnp.int32)
    return jax.random.randint(rng, codes.shape, lo, t_max).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# The step


def rcod_latent(models: generator.SDModels, unet_params: Any, unet_lora: L.LoRA | None, z_lq: jax.Array,
                ctx: jax.Array, code: jax.Array | float = DEFAULT_CODE,
                abar: jax.Array | float = RELEASE_ABAR) -> jax.Array:
    """RCOD's one step in latent space: the UNet at timestep ``code`` (scalar or [B]) with the visual context
    ``ctx`` [1 or B, N, D_cross], then :func:`fixed_abar_x0`. ``z_lq`` [B, h, w, 4] -> [B, h, w, 4] float32."""
    b = z_lq.shape[0]
    t = jnp.broadcast_to(jnp.asarray(code, jnp.float32), (b,))
    net = UNetTeacher(params=unet_params, lora=unet_lora, schedule=models.schedule, unet=models.unet)
    out = net.output(z_lq, t, generator.broadcast_prompt(ctx, b))
    return fixed_abar_x0(z_lq, out, abar, models.schedule.prediction_type)


def rcod_restore(models: generator.SDModels, unet_params: Any, vae_params: Any, trees: Mapping[str, Any],
                 x_lq: jax.Array, *, code: jax.Array | float = DEFAULT_CODE, abar: jax.Array | float = RELEASE_ABAR,
                 preprocess: str = "clip", rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The whole RCOD restoration of LQ images ``x_lq`` [B, H, W, 3] in [-1, 1] (already upscaled): CLIP vision
    + projection (the context), VAE encode (``trees["vae"]`` LoRA), the UNet step at ``code``, VAE decode.
    ``trees``: ``vision`` (:class:`VisionTower`), ``proj``, optionally ``unet``/``vae`` LoRAs. Returns
    ``(x_SR [B, H, W, 3] in [-1, 1], z [B, H/8, W/8, 4])``. Untiled; jit it with ``models`` static (the one-step
    forward benchmark's RCOD row)."""
    dtype = models.unet.dtype
    ctx = visual_context(trees["vision"], trees["proj"], x_lq, preprocess, dtype)
    z_lq = generator.encode(models, vae_params, x_lq, trees.get("vae"), rng)
    z = rcod_latent(models, unet_params, trees.get("unet"), z_lq, ctx, code, abar)
    return generator.decode(models, vae_params, z), z


def _tower(trees: Mapping[str, Any]) -> VisionTower:
    tower = trees.get("vision")
    if tower is None:
        raise ValueError("RCOD needs its CLIP vision encoder: give it with --lora vision=<folder> (a transformers "
                         "CLIPVisionModel/CLIPModel folder, e.g. openai/clip-vit-large-patch14)")
    if "proj" not in trees:
        raise ValueError("RCOD needs its visual-prompt projection (the proj tree of an export or the release file)")
    return tower


def _optimizer(config: Any, train_projection: bool) -> optax.GradientTransformation:
    """The ``gen`` group's AdamW; with ``train_projection=False`` the projection's updates are zero (and it is
    outside the gradient clipping), as in the release whose optimizer never holds it."""
    opt = common.optimizer(config)
    if train_projection:
        return opt

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "frozen" if k == "proj" else "train", v) for k, v in params.items()}

    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


CODE_KNOB = Knob("rcod_code", int, DEFAULT_CODE,
                 "RCOD: the UNet timestep code, the realism control (trained: 249 fidelity, 499, 749 realism, 999 with "
                 "4 groups; other values interpolate, outside the paper)", min=0, max=999, sweep=(249, 499, 749))
PREPROCESS_KNOB = Knob("rcod_preprocess", str, "clip",
                       "RCOD: CLIP vision input: clip (resize, crop, CLIP mean/std) or release (RCOD's 224x224 squash "
                       "of the [-1, 1] image, no normalisation: its checkpoint's)", choices=PREPROCESS_MODES)
ABAR_KNOB = Knob("rcod_abar", float, RELEASE_ABAR,
                 "RCOD: the x0 step's fixed alpha-bar, a property of the trained model (its export records it)",
                 min=1e-4, max=0.9999)


class RCOD(ImageForLFIM, Method):  # LFIM's spatial gate reads the LQ pixels
    name = "rcod"
    label = "RCOD"
    roles = {"unet": "generator UNet LoRA (+ full conv_in)", "vae": "VAE-encoder LoRA",
             "proj": "visual-prompt projection (CLIP width -> cross-attention width)",
             "vision": "the frozen CLIP vision encoder: a transformers folder (openai/clip-vit-large-patch14)"}
    required_roles = ("unet", "proj", "vision")
    text_prompt = False  # the visual prompt replaces the text at inference: no text encoder loads
    knobs = (CODE_KNOB, PREPROCESS_KNOB, ABAR_KNOB) + LFIM_KNOBS

    def config(self):
        return ml_collections.ConfigDict(dict(
            vision="",  # transformers CLIP vision folder; "": a tiny random stand-in, on random bases only
            preprocess="clip", groups=3, abar=RELEASE_ABAR, vsd_t_min_high=VSD_T_MIN_HIGH,
            vsd_split_code=VSD_SPLIT_CODE, vsd_prompt="text", train_projection=True))

    # -- inference -----------------------------------------------------------------------------------------------

    def context(self, models, trees, x_lq, c, knobs):
        mode = knobs.get("rcod_preprocess", PREPROCESS_KNOB.default)
        return visual_context(_tower(trees), trees["proj"], x_lq, mode, models.unet.dtype)

    def forward(self, models, unet_params, trees, z_lq, c, knobs, x_lq=None):
        z = rcod_latent(models, unet_params, trees.get("unet"), z_lq, c, knobs.get("rcod_code", DEFAULT_CODE),
                        knobs.get("rcod_abar", RELEASE_ABAR))
        return apply_lfim(z, z_lq, None, x_lq, knobs)

    def inference_trees(self, params, frozen):
        return {**params["gen"], "vision": frozen["vision"]}

    def module_template(self, role, config, base):
        if role != "proj":
            return super().module_template(role, config, base)
        n_in, n_out = int(config["in_features"]), int(config["out_features"])
        return {"kernel": jax.ShapeDtypeStruct((n_in, n_out), jnp.float32),
                "bias": jax.ShapeDtypeStruct((n_out,), jnp.float32)}

    def import_release(self, path, base):
        """A CLIP vision folder (the ``vision`` role) or RCOD's release ``.pkl`` (``unet``, ``vae``, ``proj``,
        with ``rcod_preprocess = release``); ``None`` for anything else."""
        from jsr.methods.export import Source
        from jsr.weights import peft

        path = Path(path)
        if path.is_dir():
            return {"vision": load_vision(path, _param_dtype(base))} if is_clip_vision_folder(path) else None
        if not common.pickle_mentions(path, RELEASE_KEY.encode()):
            return None
        loras, rest = peft.load_release(path, params={"unet": base.unet_params, "vae": base.vae_params},
                                        raw=("proj",))
        if RELEASE_KEY not in rest:
            return None
        if "unet" not in loras or set(loras) - {"unet", "vae"}:
            raise ValueError(f"{path}: an RCOD checkpoint holds a UNet LoRA and a VAE-encoder LoRA "
                             f"(state_dict_unet, state_dict_vae), found {sorted(loras)}")
        proj = projection_from_torch(rest[RELEASE_KEY])
        cross = int(base.models.unet.config.cross_attention_dim)
        if proj["kernel"].shape[1] != cross:
            raise ValueError(f"{path}: the projection outputs {proj['kernel'].shape[1]} channels, but the base's UNet "
                             f"cross-attention takes {cross}: a checkpoint for another base model")
        return Source(path, self.name, {**loras, "proj": proj}, knobs={"rcod_preprocess": "release"})

    # -- training ------------------------------------------------------------------------------------------------

    def setup(self, config, base, rng) -> TrainSetup:
        from jsr.models.common import logical_axes

        m = base.models
        lw, rc = config.loss, config.rcod
        groups, mode, abar = int(rc.groups), str(rc.preprocess), float(rc.abar)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"rcod.preprocess={mode!r}; choose one of {PREPROCESS_MODES}")
        if rc.vsd_prompt not in VSD_PROMPTS:
            raise ValueError(f"rcod.vsd_prompt={rc.vsd_prompt!r}; choose one of {VSD_PROMPTS}")
        group_codes(jnp.zeros((1,)), groups)  # checks groups
        vision_path = self._vision_path(config, base)
        tower = load_vision(vision_path, _param_dtype(base))
        dtype = m.unet.dtype
        frozen = common.base_frozen(config, base, rng)
        frozen["vision"] = tower
        hidden, cross = tower.config.hidden_size, int(m.unet.config.cross_attention_dim)
        k_gen, k_fake, k_proj = jax.random.split(jax.random.fold_in(rng, 16), 3)
        params = {"gen": {"unet": L.init(k_gen, base.unet_params, L.OSEDIFF_UNET),
                          "vae": L.init(jax.random.fold_in(k_gen, 1), base.vae_params, L.OSEDIFF_VAE),
                          "proj": init_projection(k_proj, hidden, cross)}}
        use_vsd = lw.vsd > 0
        visual_vsd = rc.vsd_prompt == "visual"
        train_proj = bool(rc.train_projection)
        if use_vsd and visual_vsd:  # CLIP of the zero image is a constant; only its projection trains
            s = tower.config.image_size
            frozen["zero_tokens"] = vision_tokens(tower, jnp.zeros((1, s, s, 3), jnp.float32), mode, dtype)
        rec = common.reconstruction(config)
        t_min, t_min_high, t_max, split = int(lw.vsd_t_min), int(rc.vsd_t_min_high), int(lw.vsd_t_max), int(
            rc.vsd_split_code)

        def gen_loss(params, frozen_, batch, rng_, carry):
            k_enc, k_hq, k_t, k_vsd = jax.random.split(rng_, 4)
            x_lq, x_hq = common.images(batch)
            g = params["gen"]
            proj = g["proj"] if train_proj else jax.lax.stop_gradient(g["proj"])
            z_lq = generator.encode(m, frozen_["vae"], x_lq, g["vae"], rng=k_enc)
            z_hq = jax.lax.stop_gradient(generator.encode(m, frozen_["vae"], x_hq, g["vae"], rng=k_hq))
            cos = latent_cosine(jax.lax.stop_gradient(z_lq), z_hq)
            codes = group_codes(cos, groups)
            ctx = visual_context(frozen_["vision"], proj, x_lq, mode, dtype)
            z_hat = rcod_latent(m, frozen_["unet"], g["unet"], z_lq, ctx, codes, abar)
            x_sr = generator.decode(m, frozen_["vae"], z_hat)
            total, parts = rec(x_sr, x_hq, frozen_)
            parts = {**parts, "cos": jnp.mean(cos), "code": jnp.mean(codes),
                     "low_code_frac": jnp.mean((codes < split).astype(jnp.float32))}
            c_pos = batch["c"]
            if use_vsd:
                if visual_vsd:
                    c_pos = jax.lax.stop_gradient(ctx)
                    c_neg = jax.lax.stop_gradient(project(proj, frozen_["zero_tokens"]))
                else:
                    c_neg = frozen_["c_neg"]
                t = vsd_timesteps(k_t, codes, t_min, t_min_high, t_max, split)
                vsd, p = common.vsd_term(m, frozen_, params["fake"]["unet"], z_hat, c_pos, c_neg, k_vsd, lw, t=t)
                total = total + vsd
                parts = {**parts, **p}
            return total, (parts, {"z_hat": jax.lax.stop_gradient(z_hat), "c": jax.lax.stop_gradient(c_pos)})

        updates = [Update("gen", gen_loss, _optimizer(config, train_proj))]
        if use_vsd:
            params["fake"] = {"unet": L.init(k_fake, base.unet_params, FAKE_SCORE_UNET)}
            # The fake score learns the generator's outputs under the prompt VSD conditions it on.
            updates.append(common.fake_score_update(m, config, lambda batch, carry: carry["c"]))
        vision_axes = VisionTower(params=logical_axes(tower.module()), config=tower.config)
        return TrainSetup(
            params=params, phases=[(0, updates)], frozen=frozen,
            export={"gen": {"unet": ExportEntry("unet"), "vae": ExportEntry("vae"),
                            "proj": ExportEntry("proj", {"in_features": hidden, "out_features": cross})}},
            requires={"vision": str(Path(vision_path).absolute())},
            knob_defaults={"rcod_preprocess": mode, "rcod_abar": abar},
            frozen_axes={"vision": vision_axes})

    @staticmethod
    def _vision_path(config: Any, base: Any) -> str:
        """``config.rcod.vision``, or on a random base without one the tiny random stand-in (written once)."""
        path = config.rcod.vision
        if path:
            if not is_clip_vision_folder(path):
                raise ValueError(f"rcod.vision={path!r} is not a transformers CLIP vision folder (want config.json "
                                 "with model_type clip_vision_model or clip, e.g. openai/clip-vit-large-patch14)")
            return str(path)
        if not base.random_weights:
            raise ValueError("rcod.vision is empty: RCOD needs a CLIP vision encoder (a transformers folder of "
                             "openai/clip-vit-large-patch14); only random stand-in bases run with a random tiny one")
        from jsr.weights.tiny import default_tiny_clip_vision_dir, write_tiny_clip_vision

        seed = int(config.model.tiny_seed)
        return str(write_tiny_clip_vision(default_tiny_clip_vision_dir(seed), seed=seed))


def _param_dtype(base: Any) -> Any:
    """The storage dtype of the base's parameters (the vision encoder is stored alike)."""
    return jax.tree.leaves(base.unet_params)[0].dtype


registry.register(RCOD)
