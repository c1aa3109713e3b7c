"""One-step SR restoration of image arrays of any size: the restorer, its tiling, colour fix and controls.

    from jsr.sr.infer import load_restorer, RestoreOptions, upscale_bicubic
    r = load_restorer("sd21-base", ["export/student"], control_lora="export/control")
    sr = r(upscale_bicubic(lq, 4)[None], RestoreOptions(t=0.3))      # [1, 4h, 4w, 3] in [0, 1]

(``python -m jsr.infer`` wraps this for files, folders and globs: :mod:`jsr.infer`.)

The pipeline for a batch of same-size LQ images (NHWC):

1. **Upscale** the LQ by 4 (bicubic, :func:`upscale_bicubic`) to the output size: the generator's input, as
   OSEDiff feeds it (values in [0, 1], clipped after the bicubic overshoot). The caller does this step.
2. **Pad** to a multiple of 8 by mirror reflection (the VAE downsamples by 8); the output is cropped back, so any
   size goes in (37 x 53 LQ -> 148 x 212 SR).
3. **Encode** with the VAE (+ encoder LoRA), in pixel tiles of ``vae_tile`` when the image is larger; the
   posterior mean, so the output is deterministic. Tiles share whole-image GroupNorm statistics and the
   mid-block attention sees the whole image (``jsr.sr.staged_tiling``), so tiling costs only border context.
4. **The one step** in latent space, in latent tiles of ``latent_tile`` with ``latent_overlap`` and Gaussian
   blending when the latent is larger: OSEDiff ``x0(z, U(z, 999))``, PiSA-SR ``z - (lp eps_pix + ls eps_sem)``,
   or CTSR's stage-1 latent moved to the control ``t`` (``jsr.sr.generator``).
5. **Decode** in latent tiles of ``vae_tile / 8``, tiled as the encoder; crop, map to [0, 1].
6. **Colour fix** against the upscaled LQ (AdaIN by default, as OSEDiff and CTSR; wavelet; none).

Tiling keeps device memory bounded (one batch of tiles at a time, blending or assembling on the host); its error
against a whole-image pass is discussed in :mod:`jsr.sr.tiling` (the latent step) and :mod:`jsr.sr.staged_tiling`
(the VAE).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jsr.models import lora as lora_lib
from jsr.sr import colorfix, losses, tiling
from jsr.sr.staged_tiling import TiledVAE
from jsr.sr import generator as gen
from jsr.sr.base import Base, load_base
from jsr.weights import load_peft_lora

METHODS = ("auto", "osediff", "ctsr", "pisasr")


def upscale_bicubic(img: np.ndarray, factor: float) -> np.ndarray:
    """Bicubic resize of [H, W, C] float [0, 1] by ``factor`` to ``(round(H f), round(W f))`` (PIL's bicubic,
    per channel in float so nothing is quantised), clipped to [0, 1]."""
    h, w = img.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return img.astype(np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32))
                        .resize(size, Image.BICUBIC)) for c in range(img.shape[-1])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """Per-run settings of :class:`Restorer` (sizes in pixels of the named space).

    Attributes:
      t: CTSR control in [0, 1] (0 = the stage-1/realism end, 1 = fidelity); ignored by other methods.
      t_steps: Euler steps of CTSR's learned flow (0 = the one-call flow point, see ``control_latent``).
      lambda_pix, lambda_sem: PiSA-SR's pixel and semantic guidance weights.
      color_fix: ``adain``, ``wavelet`` or ``none``.
      latent_tile, latent_overlap: UNet tiles in latent pixels (the step runs whole when the latent fits).
      vae_tile, vae_overlap: VAE tiles in output pixels (encode: that many pixels; decode: / 8 latents);
        ``0`` = never tile the VAE. Each tile keeps half the overlap as context around the part it outputs:
        the default 176 px is 11 latents, Tiled-VAE's decoder padding. An overlap as large as the tile is
        clipped to leave one step of 8 pixels (1 latent).
      tiles_per_call: tiles batched into one call of the UNet / VAE.
      pad_multiple: pad the upscaled image to a multiple of this (8: the VAE's downsampling).
    """

    t: float = 0.0
    t_steps: int = 0
    lambda_pix: float = 1.0
    lambda_sem: float = 1.0
    color_fix: str = "adain"
    latent_tile: int = 96
    latent_overlap: int = 32
    vae_tile: int = 1024
    vae_overlap: int = 176
    tiles_per_call: int = 1
    pad_multiple: int = 8

    def __post_init__(self):
        if self.color_fix not in colorfix.METHODS:
            raise ValueError(f"color_fix must be one of {colorfix.METHODS}, got {self.color_fix!r}")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"the control t must be in [0, 1], got {self.t}")
        if self.latent_tile < 8 or not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(f"latent tile {self.latent_tile} must be >= 8 and overlap {self.latent_overlap} "
                             "in [0, tile)")
        if self.vae_tile and self.vae_tile < 64 or self.vae_overlap < 0:
            raise ValueError(f"vae tile {self.vae_tile} must be 0 (off) or >= 64 px, overlap {self.vae_overlap} "
                             ">= 0")
        if self.pad_multiple % 8:
            raise ValueError(f"pad_multiple must be a multiple of 8, got {self.pad_multiple}")

    def knobs_set(self) -> set[str]:
        """The controls set away from their defaults (``t``, ``t_steps``, ``lambda_pix``, ``lambda_sem``)."""
        default = RestoreOptions()
        return {k for k in ("t", "t_steps", "lambda_pix", "lambda_sem") if getattr(self, k) != getattr(default, k)}


EncodeFn = Callable[[Any], Any]  # [n, H, W, 3] in [-1, 1] -> [n, H/8, W/8, 4] scaled latents
LatentFn = Callable[[Any, "RestoreOptions"], Any]  # ([n, h, w, 4], options: the controls) -> [n, h, w, 4]
DecodeFn = Callable[[Any], Any]  # [n, h, w, 4] -> [n, 8h, 8w, 3] in [-1, 1]


@dataclasses.dataclass
class Restorer:
    """A one-step restorer as three maps (each jitted, parameters bound) plus its method name.

    Build one from checkpoints with :func:`load_restorer`; tests build one from stand-in callables. ``knobs``
    names the controls of :class:`RestoreOptions` the latent step honours (:func:`check_options` refuses others).
    ``tiled_vae`` runs the VAE on large images (:class:`jsr.sr.staged_tiling.TiledVAE`); without one (stand-in
    maps) ``encode``/``decode`` are tiled by blending (``jsr.sr.tiling``), exact only for local maps.
    """

    encode: EncodeFn
    latent: LatentFn
    decode: DecodeFn
    method: str = "osediff"
    knobs: tuple[str, ...] = ()
    factor: int = 8  # VAE downsampling
    tiled_vae: TiledVAE | None = None

    def __call__(self, x_up: np.ndarray, opts: RestoreOptions = RestoreOptions()) -> np.ndarray:
        """Restore a batch of upscaled LQ images [B, H, W, 3] in [0, 1] (any H, W) -> SR [B, H, W, 3] in [0, 1]
        (float32, numpy)."""
        x_up = np.asarray(x_up, np.float32)
        if x_up.ndim != 4 or x_up.shape[-1] != 3:
            raise ValueError(f"restorer wants NHWC RGB images [B, H, W, 3], got shape {x_up.shape}")
        padded, size = tiling.pad_to_multiple(x_up, max(self.factor, opts.pad_multiple))
        x = padded * 2.0 - 1.0
        z = self._encode(x, opts)
        z = tiling.tiled_map(lambda zt: self.latent(zt, opts), z, opts.latent_tile, opts.latent_overlap,
                             tiles_per_call=opts.tiles_per_call)
        y = self._decode(z, opts)
        y = (np.clip(tiling.crop_to(y, size), -1.0, 1.0) + 1.0) / 2.0
        return np.asarray(colorfix.color_fix(y, x_up, opts.color_fix, clip=True), np.float32)

    def _encode(self, x: np.ndarray, opts: RestoreOptions) -> np.ndarray:
        if not opts.vae_tile or max(x.shape[1:3]) <= opts.vae_tile:  # one tile: the whole-image program
            return np.asarray(self.encode(x), np.float32)
        if self.tiled_vae is not None:
            return self.tiled_vae.encode(x, opts.vae_tile, opts.vae_overlap, opts.tiles_per_call)
        return tiling.tiled_encode(self.encode, x, opts.vae_tile, opts.vae_overlap, opts.tiles_per_call,
                                   self.factor)

    def _decode(self, z: np.ndarray, opts: RestoreOptions) -> np.ndarray:
        tile = max(1, opts.vae_tile // self.factor)
        if not opts.vae_tile or max(z.shape[1:3]) <= tile:
            return np.asarray(self.decode(z), np.float32)
        overlap = min(tile - 1, -(-opts.vae_overlap // self.factor))
        if self.tiled_vae is not None:
            return self.tiled_vae.decode(z, tile, overlap, opts.tiles_per_call)
        return tiling.tiled_decode(self.decode, z, tile, overlap, opts.tiles_per_call, self.factor)


# ----------------------------------------------------------------------------------------------------------------
# Loading a model


LORA_ROLES = {"unet": "unet", "vae": "vae", "unet_pix": "pix", "unet_sem": "sem"}


def _fits(lora: Any, params: Any) -> bool:
    try:
        lora_lib.check(lora, params)
        return True
    except lora_lib.LoRAMismatchError:
        return False


def read_loras(path: str | os.PathLike) -> dict[str, Any]:
    """``{name: LoRA}`` from a LoRA file/folder (:func:`jsr.weights.load_peft_lora`) or a jsr training export
    folder (``<workdir>/export/<group>`` holding ``unet/`` and/or ``vae/`` peft folders: named by subfolder)."""
    path = Path(path)
    if path.is_dir() and any((path / m).is_dir() for m in ("unet", "vae")):
        out = {}
        for model in ("unet", "vae"):
            if (path / model).is_dir():
                found = load_peft_lora(path / model)
                if len(found) != 1:
                    raise ValueError(f"{path / model}: expected one LoRA, found {sorted(found)}")
                out[model] = next(iter(found.values()))
        return out
    return load_peft_lora(path)


def assign_loras(loras: Sequence[str | os.PathLike], unet_params: Any, vae_params: Any, *,
                 control_lora: str | os.PathLike | None = None,
                 sem_lora: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read LoRAs (:func:`read_loras`) and give each its role: ``unet`` (the generator / CTSR stage 1), ``vae``
    (encoder), ``pix`` and ``sem`` (PiSA-SR), ``control`` (CTSR stage 2).

    Named LoRAs keep their names' role (OSEDiff releases and jsr exports: ``unet``, ``vae``; PiSA-SR:
    ``unet_pix``, ``unet_sem``); an unnamed one (a plain peft file, ``default``) takes ``unet`` or ``vae`` by
    which model's parameters it fits. ``control_lora`` and ``sem_lora`` must hold one UNet LoRA each. Every LoRA
    is checked against its model (a mismatch names the layers).
    """
    roles: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(role: str, lo: Any, src: str) -> None:
        if role in roles:
            raise ValueError(f"two LoRAs for the {role} role: one from {where[role]}, one from {src}")
        model_params = vae_params if role == "vae" else unet_params
        try:
            lora_lib.check(lo, model_params)
        except lora_lib.LoRAMismatchError as e:
            raise lora_lib.LoRAMismatchError(f"{src}: the {role} LoRA does not fit the base model: {e}") from None
        roles[role], where[role] = lo, src

    def unet_only(path: str | os.PathLike, role: str) -> None:
        found = read_loras(path)
        unets = [lo for lo in found.values() if _fits(lo, unet_params)]
        if len(found) != 1 or len(unets) != 1:
            raise ValueError(f"{path}: the {role} LoRA must be one UNet LoRA, found {sorted(found)}")
        put(role, unets[0], str(path))

    for path in loras:
        for name, lo in read_loras(path).items():
            role = LORA_ROLES.get(name)
            if role is None:
                role = "unet" if _fits(lo, unet_params) else "vae" if _fits(lo, vae_params) else None
            if role is None:
                raise lora_lib.LoRAMismatchError(f"{path}: LoRA {name!r} fits neither the UNet nor the VAE of "
                                                 "the base model (another base model or architecture?)")
            put(role, lo, f"{path} ({name})")
    if control_lora is not None:
        unet_only(control_lora, "control")
    if sem_lora is not None:
        unet_only(sem_lora, "sem")
    return roles


def pick_method(method: str, roles: Mapping[str, Any]) -> str:
    """``auto`` -> ``ctsr`` with a control LoRA, ``pisasr`` with a pixel/semantic LoRA, else ``osediff``; an
    explicit method must be given the LoRAs it uses and no others."""
    if method == "auto":
        method = "ctsr" if "control" in roles else "pisasr" if {"pix", "sem"} & set(roles) else "osediff"
    allowed = {"osediff": {"unet", "vae"}, "ctsr": {"unet", "vae", "control"},
               "pisasr": {"unet", "pix", "sem"}}[method]
    extra = set(roles) - allowed
    if extra:
        raise ValueError(f"method {method} does not use the {', '.join(sorted(extra))} LoRA(s) given")
    if method == "pisasr" and "unet" in roles and "pix" in roles:
        raise ValueError("pisasr: both a plain UNet LoRA and a pixel LoRA were given; pass one pixel LoRA")
    return method


def _encode_step(models, vae_params, vae_lora, x):
    return gen.encode(models, vae_params, x, vae_lora)


def _decode_step(models, vae_params, z):
    return gen.decode(models, vae_params, z)


def _osediff_step(models, unet_params, lora, z, c):
    return gen.osediff_latent(models, unet_params, lora, z, c)


def _ctsr_step(models, unet_params, stage1, control, z, c, t, t_scale=999.0, steps=0):
    c = jnp.broadcast_to(c, (z.shape[0],) + c.shape[1:])  # one prompt for the batch (of images or tiles)
    z0 = gen.osediff_latent(models, unet_params, stage1, z, c)
    student = gen.ctsr_student(models, unet_params, stage1, control)
    return losses.control_latent(z0, t, c, student_eps=student.eps, t_scale=t_scale, steps=steps)


def _pisasr_step(models, unet_params, pix, sem, z, c, lambda_pix, lambda_sem):
    return gen.pisasr_latent(models, unet_params, pix, sem, z, c, lambda_pix, lambda_sem)


def _pisasr_both_step(models, unet_params, pix, sem, z, c):
    return gen.pisasr_latent(models, unet_params, pix, sem, z, c, 1.0, 1.0)  # eps_pix+sem alone: one UNet call


_STEPS: dict[str, Callable] = {}


def _step(name: str) -> Callable:
    """The jitted step ``name`` (created once per process, so restorers over one base share compilations)."""
    if name not in _STEPS:
        _STEPS[name] = jax.jit(globals()[f"_{name}_step"], static_argnums=0,
                               static_argnames=("t_scale", "steps") if name == "ctsr" else ())
    return _STEPS[name]


def load_restorer(model: str | os.PathLike | Base, lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  *, control_lora: str | os.PathLike | None = None, sem_lora: str | os.PathLike | None = None,
                  method: str = "auto", dtype: Any = None, prompt: str = "", t_scale: float = 999.0,
                  attention_impl: str = "auto") -> Restorer:
    """A :class:`Restorer` from a base SD folder (or a loaded :class:`jsr.sr.base.Base`) and LoRAs.

    Args:
      model: diffusers-layout SD folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), ``"tiny"`` for the
        embedded tiny random model (a smoke test), or a ``Base`` (then ``dtype``/``attention_impl`` are unused).
      lora: one or more LoRA files/folders (OSEDiff/PiSA-SR ``.pkl``, peft/diffusers safetensors, jsr training
        exports ``<workdir>/export/<group>``), see :func:`assign_loras`.
      control_lora: CTSR's stage-2 LoRA (``export/control``); sem_lora: PiSA-SR's semantic LoRA as its own file.
      method: ``auto``, ``osediff``, ``ctsr`` or ``pisasr`` (:func:`pick_method`).
      dtype: compute and parameter dtype (``"bfloat16"``, ``"float32"``); default bf16 on an accelerator, f32 on
        CPU. LoRA factors stay float32.
      prompt: the text condition (OSEDiff/PiSA-SR use tags from a tagging model; without one, ``""``).
      t_scale: CTSR's control-to-UNet-timestep scale; must equal the stage-2 training's ``ctsr.t_scale``.
    """
    if isinstance(model, Base):
        base = model
    else:
        if dtype is None:
            dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        base = load_base("" if str(model) == "tiny" and not Path(model).exists() else model,
                         dtype=jnp.dtype(dtype), attention=attention_impl)
    models, up, vp = base.models, base.unet_params, base.vae_params
    c = base.prompts([prompt])
    lora_files = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
    roles = assign_loras(lora_files, up, vp, control_lora=control_lora, sem_lora=sem_lora)
    method = pick_method(method, roles)
    vae_lora = roles.get("vae")

    def encode(x):
        return _step("encode")(models, vp, vae_lora, x)

    def decode(z):
        return _step("decode")(models, vp, z)

    if method == "osediff":
        knobs: tuple[str, ...] = ()

        def latent(z, opts):
            return _step("osediff")(models, up, roles.get("unet"), z, c)
    elif method == "ctsr":
        knobs = ("t", "t_steps") if "control" in roles else ()

        def latent(z, opts):
            return _step("ctsr")(models, up, roles.get("unet"), roles.get("control"), z, c, jnp.float32(opts.t),
                                 t_scale=float(t_scale), steps=int(opts.t_steps))
    else:
        pix, sem = roles.get("pix", roles.get("unet")), roles.get("sem")
        knobs = ("lambda_pix", "lambda_sem") if sem is not None else ("lambda_pix",)

        def latent(z, opts):
            if sem is not None and opts.lambda_pix == 1.0 and opts.lambda_sem == 1.0:
                return _step("pisasr_both")(models, up, pix, sem, z, c)
            return _step("pisasr")(models, up, pix, sem, z, c, jnp.float32(opts.lambda_pix),
                                   jnp.float32(opts.lambda_sem))

    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return Restorer(encode=encode, latent=latent, decode=decode, method=method, knobs=knobs, factor=factor,
                    tiled_vae=TiledVAE(models, vp, vae_lora))


# What each control of RestoreOptions needs, named as the thing rather than as one command line's flag: the
# callers spell their flags differently (jsr.infer: --control-lora; evaluate.py: --control_lora).
_KNOB_NEEDS = {"t": "a CTSR control LoRA (stage 2)", "t_steps": "a CTSR control LoRA (stage 2)",
               "lambda_pix": "a PiSA-SR model", "lambda_sem": "a PiSA-SR semantic LoRA"}


def check_options(restorer: Restorer, opts: RestoreOptions) -> None:
    """Refuse controls the restorer would ignore (``t`` without a CTSR control LoRA, ``lambda_sem`` without a
    semantic LoRA...), so a sweep never silently produces identical images.

    Raises:
      ValueError naming the ignored controls (as :class:`RestoreOptions` fields), the restorer's own controls,
      and what each ignored one needs, e.g. ``osediff model ignores t (its controls: none); t needs a CTSR
      control LoRA (stage 2)``.
    """
    unused = sorted(opts.knobs_set() - set(restorer.knobs))
    if unused:
        have = ", ".join(restorer.knobs) or "none"
        needs: dict[str, list[str]] = {}
        for knob in unused:
            needs.setdefault(_KNOB_NEEDS[knob], []).append(knob)
        why = "; ".join(f"{' and '.join(ks)} need{'s' if len(ks) == 1 else ''} {what}" for what, ks in needs.items())
        raise ValueError(f"{restorer.method} model ignores {', '.join(unused)} (its controls: {have}); {why}")
