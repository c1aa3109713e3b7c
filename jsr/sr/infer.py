"""One-step SR restoration of image arrays of any size: the restorer, its tiling, colour fix and controls.

    from jsr.methods.restorer import load_restorer
    from jsr.sr.infer import RestoreOptions, upscale_bicubic
    r = load_restorer("sd21-base", ["export/student", "control=export/control"])
    sr = r(upscale_bicubic(lq, 4)[None], RestoreOptions(knobs={"t": 0.3}))      # [1, 4h, 4w, 3] in [0, 1]

This module is the method-agnostic machinery (the :class:`Restorer`: padding, tiling, colour fix);
:func:`jsr.methods.restorer.load_restorer` builds one from a registered method and its files, and
``python -m jsr.infer`` wraps that for files, folders and globs (:mod:`jsr.infer`).

The pipeline for a batch of same-size LQ images (NHWC):

1. **Upscale** the LQ by 4 (bicubic, :func:`upscale_bicubic`) to the output size: the generator's input, as
   OSEDiff feeds it (values in [0, 1], clipped after the bicubic overshoot). The caller does this step.
2. **Pad** to a multiple of 8 by mirror reflection (the VAE downsamples by 8); the output is cropped back, so any
   size goes in (37 x 53 LQ -> 148 x 212 SR).
3. **Encode** with the VAE (+ encoder LoRA), in pixel tiles of ``vae_tile`` when the image is larger; the
   posterior mean, so the output is deterministic. Tiles share whole-image GroupNorm statistics and the
   mid-block attention sees the whole image (``jsr.sr.staged_tiling``), so tiling costs only border context.
4. **The one step** in latent space (the method's ``forward`` with its knobs), in latent tiles of
   ``latent_tile`` with ``latent_overlap`` and Gaussian blending when the latent is larger. A method that also
   reads the LQ pixels there (``uses_image``) gets each tile's pixels: they travel with the latent as 192
   extra channels (8x8 pixels per latent), so one tiler cuts both identically.
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

from jsr.console import compiling
from jsr.sr import colorfix, tiling
from jsr.sr.staged_tiling import TiledVAE


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
      knobs: the method's controls by name (``{"t": 0.3}`` for CTSR, ``{"lambda_sem": 0.8}`` for PiSA-SR: see
        each method's ``knobs`` in :mod:`jsr.methods`); knobs not given take the model's defaults. A knob the
        restorer does not honour is refused (:func:`jsr.methods.restorer.check_options`).
      color_fix: ``adain``, ``wavelet`` or ``none``.
      latent_tile, latent_overlap: UNet tiles in latent pixels (the step runs whole when the latent fits).
      vae_tile, vae_overlap: VAE tiles in output pixels (encode: that many pixels; decode: / 8 latents);
        ``0`` = never tile the VAE. Each tile keeps half the overlap as context around the part it outputs:
        the default 176 px is 11 latents, Tiled-VAE's decoder padding. An overlap as large as the tile is
        clipped to leave one step of 8 pixels (1 latent).
      tiles_per_call: tiles batched into one call of the UNet / VAE.
      pad_multiple: pad the upscaled image to a multiple of this (8: the VAE's downsampling).
    """

    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
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
        if self.latent_tile < 8 or not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(f"latent tile {self.latent_tile} must be >= 8 and overlap {self.latent_overlap} "
                             "in [0, tile)")
        if self.vae_tile and self.vae_tile < 64 or self.vae_overlap < 0:
            raise ValueError(f"vae tile {self.vae_tile} must be 0 (off) or >= 64 px, overlap {self.vae_overlap} "
                             ">= 0")
        if self.pad_multiple % 8:
            raise ValueError(f"pad_multiple must be a multiple of 8, got {self.pad_multiple}")

    def with_knobs(self, **knobs: Any) -> "RestoreOptions":
        """A copy with ``knobs`` set (over the ones already set)."""
        return dataclasses.replace(self, knobs={**self.knobs, **knobs})


EncodeFn = Callable[[Any], Any]  # [n, H, W, 3] in [-1, 1] -> [n, H/8, W/8, 4] scaled latents
LatentFn = Callable[[Any, "RestoreOptions"], Any]  # ([n, h, w, 4 (+192)], options: the knobs) -> [n, h, w, 4]
DecodeFn = Callable[[Any], Any]  # [n, h, w, 4] -> [n, 8h, 8w, 3] in [-1, 1]


@dataclasses.dataclass
class Restorer:
    """A one-step restorer as three maps (each jitted, parameters bound) plus its method name.

    Build one from checkpoints with :func:`jsr.methods.restorer.load_restorer`; tests build one from stand-in
    callables. ``knobs`` names the controls (:attr:`RestoreOptions.knobs`) the latent step honours and
    ``knob_defaults`` their values when not given (a method's defaults, or an export's). ``tiled_vae`` runs the
    VAE on large images (:class:`jsr.sr.staged_tiling.TiledVAE`); without one (stand-in maps)
    ``encode``/``decode`` are tiled by blending (``jsr.sr.tiling``), exact only for local maps. ``uses_image``:
    the latent step also reads the LQ pixels (see the module docstring, step 4). ``label``: the model's name in
    tables (default: the method name). ``context``: ``(x [B, H, W, 3] in [-1, 1], options) -> ctx``, computed
    once on the whole (padded) images and passed to ``latent(z, options, ctx)`` for every tile (a method whose
    cross-attention context comes from the image); ``None``: ``latent(z, options)``.
    """

    encode: EncodeFn
    latent: LatentFn
    decode: DecodeFn
    method: str = "osediff"
    knobs: tuple[str, ...] = ()
    factor: int = 8  # VAE downsampling
    tiled_vae: TiledVAE | None = None
    knob_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uses_image: bool = False
    label: str = ""
    context: Callable[[Any, "RestoreOptions"], Any] | None = None
    _sizes_seen: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    def __call__(self, x_up: np.ndarray, opts: RestoreOptions = RestoreOptions()) -> np.ndarray:
        """Restore a batch of upscaled LQ images [B, H, W, 3] in [0, 1] (any H, W) -> SR [B, H, W, 3] in [0, 1]
        (float32, numpy)."""
        x_up = np.asarray(x_up, np.float32)
        if x_up.ndim != 4 or x_up.shape[-1] != 3:
            raise ValueError(f"restorer wants NHWC RGB images [B, H, W, 3], got shape {x_up.shape}")
        padded, size = tiling.pad_to_multiple(x_up, max(self.factor, opts.pad_multiple))
        key = (padded.shape, opts.latent_tile, opts.vae_tile, opts.tiles_per_call)
        if key not in self._sizes_seen:  # a new size compiles what it needs: minutes for a real model on a CPU
            self._sizes_seen.add(key)
            b, h, w, _ = padded.shape
            compiling(f"the {self.method} restorer for {b} x {w}x{h} images")
        x = padded * 2.0 - 1.0
        z = self._encode(x, opts)
        if self.uses_image:  # the pixels under each latent travel with it through the tiler (8x8 -> 192 channels)
            b, h, w, _ = z.shape
            f = self.factor
            px = x.reshape(b, h, f, w, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, f * f * 3)
            z = np.concatenate([z, px.astype(np.float32)], axis=-1)
        if self.context is None:
            step = lambda zt: self.latent(zt, opts)  # noqa: E731
        else:
            ctx = self.context(x, opts)
            step = lambda zt: self.latent(zt, opts, ctx)  # noqa: E731
        z = tiling.tiled_map(step, z, opts.latent_tile, opts.latent_overlap, tiles_per_call=opts.tiles_per_call)
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
