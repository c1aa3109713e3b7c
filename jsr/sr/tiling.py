"""Tiled evaluation of image-to-image functions with Gaussian-weighted overlap, for images of any size.

A one-step restorer is three maps: VAE encode (pixels -> latents, /8), the UNet step (latents -> latents) and VAE
decode (latents -> pixels, x8). Each runs on the whole image when it fits, and otherwise on overlapping tiles:

1. :func:`tile_starts` covers an axis of length ``size`` with tiles of length ``tile`` whose neighbours overlap by
   at least ``overlap``; the tiles are spread evenly, the first starts at 0 and the last ends at ``size``. Starts
   are multiples of ``align`` (8 in pixel space, so every tile maps onto whole latent pixels).
2. Every tile is run through ``fn`` (all tiles have one shape, so ``fn`` compiles once; ``tiles_per_call`` tiles
   go through it as one batch).
3. Outputs are blended with a separable Gaussian weight centred on each tile,
   ``w(i) = exp(-((i - (n-1)/2) / n)^2 / (2 var))`` per axis (``var = 0.01``, sigma = a tenth of the tile, as
   OSEDiff/Mixture-of-Diffusers blend latent tiles): ``out = sum_k w_k f(tile_k) / sum_k w_k``. Where one
   tile alone covers a pixel the result is that tile's output exactly; in overlaps the tile whose centre is
   nearer dominates, which hides the tile borders, where ``fn`` sees the least context.

The accumulator lives on the host (numpy, float32), so device memory holds one batch of tiles, never the
full-size intermediates: this is what bounds memory for large images.

Exactness. For a function whose output at a pixel depends only on inputs within ``r`` pixels (a stack of
convolutions with receptive-field radius ``r``), tiling is exact wherever every contributing tile has that pixel
at least ``r`` away from its inner borders, i.e. when ``overlap >= 2 r``, up to the Gaussian weights' leak: a
tile that sees the pixel with too little context still weighs ``exp(-((T/2 - r)/T)^2 / 0.02)`` of its centre
there (2.6e-4 for ``r = 3``, ``T = 32``). The SD UNet and VAE are *not* local: GroupNorm normalises with
statistics over the tile, the VAE's mid-block and the UNet's transformer blocks attend over the tile, and
receptive fields span hundreds of pixels, so tiled and untiled outputs differ by how much a tile's statistics and
context differ from the whole image's. That is the price of bounded memory; larger tiles shrink it. Measured on
tiny random SD models (``tests/test_infer.py``; 2-core CPU, 2026-11-23) the difference is spread evenly over the
tiles rather than concentrated at their seams: it comes from the statistics more than from missing context.
That is why the restorer does not tile the VAE with this module: :mod:`jsr.sr.staged_tiling` runs it stage by
stage with whole-image GroupNorm statistics and attention, leaving only the border context. The latent step
(the UNet) is tiled here, blended, as OSEDiff tiles it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ArrayFn = Callable[[jax.Array], Any]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``min(tile, size)`` covering ``[0, size)`` with neighbours overlapping by at
    least ``overlap`` (rounded up to a multiple of ``align``), evenly spread; ``[0]`` when one tile covers it.

    ``size`` and ``tile`` must be multiples of ``align``; every start is one.
    """
    if size <= 0 or tile <= 0 or align <= 0:
        raise ValueError(f"tile_starts: size {size}, tile {tile} and align {align} must be positive")
    if size % align or tile % align:
        raise ValueError(f"tile_starts: size {size} and tile {tile} must be multiples of {align}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile) = [0, {tile})")
    if size <= tile:
        return [0]
    n_units, t_units = size // align, tile // align
    stride = t_units - math.ceil(overlap / align)  # in align units, >= 1 since overlap < tile
    if stride < 1:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves no stride at alignment {align}")
    span = n_units - t_units  # where the last tile starts
    n = math.ceil(span / stride) + 1
    # Evenly spread: consecutive starts differ by round-offs of span/(n-1) <= stride, so the overlap holds.
    return [align * round(i * span / (n - 1)) for i in range(n)]


def gaussian_weights(height: int, width: int, var: float = 0.01) -> np.ndarray:
    """Separable Gaussian blending weights [height, width] (float32, peak ~1 at the centre): per axis of length
    ``n``, ``exp(-((i - (n-1)/2) / n)^2 / (2 var))``."""
    def axis(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return np.exp(-(((i - (n - 1) / 2) / n) ** 2) / (2 * var))
    return np.outer(axis(height), axis(width)).astype(np.float32)


def scaled(v: int, scale: Fraction, what: str = "size") -> int:
    """``v * scale`` as an int; ``ValueError`` naming ``what`` when it is not a whole number of pixels."""
    out = v * scale
    if out.denominator != 1:
        raise ValueError(f"{what} {v} times scale {scale} is not a whole number of output pixels")
    return int(out)


def _grid(shape: Sequence[int], tile: int | Sequence[int], overlap: int, align: int) -> tuple[int, int, int]:
    """``(th, tw, tiles)`` of :func:`tiled_map` on an input of ``shape`` [B, H, W, C]: the tile clipped to the
    input, and how many tiles cover it (1 when the input fits one tile)."""
    h, w = shape[1], shape[2]
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    th, tw = min(th, h), min(tw, w)
    if th >= h and tw >= w:
        return h, w, 1
    return th, tw, (len(tile_starts(h, th, max(0, min(overlap, th - align)), align))
                    * len(tile_starts(w, tw, max(0, min(overlap, tw - align)), align)))


def tile_calls(shape: Sequence[int], tile: int | Sequence[int], overlap: int, align: int = 1,
               tiles_per_call: int = 1) -> int:
    """How many calls of ``fn`` :func:`tiled_map` makes on an input of ``shape`` [B, H, W, C] (1: untiled)."""
    n = _grid(shape, tile, overlap, align)[2]
    return -(-n // max(1, int(tiles_per_call)))


def call_shape(shape: Sequence[int], tile: int | Sequence[int], overlap: int, align: int = 1,
               tiles_per_call: int = 1) -> tuple[int, int, int]:
    """The input shape ``(rows, th, tw)`` of each call :func:`tiled_map` makes on an input of ``shape``
    [B, H, W, C]: every call has one shape (the whole input when it fits one tile)."""
    th, tw, n = _grid(shape, tile, overlap, align)
    return shape[0] * min(n, max(1, int(tiles_per_call))), th, tw


def tiled_map(fn: ArrayFn, x: jax.Array | np.ndarray, tile: int | Sequence[int], overlap: int, *,
              scale: int | float | Fraction = 1, align: int = 1, tiles_per_call: int = 1,
              var: float = 0.01, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``fn`` applied to ``x`` tile by tile and blended with Gaussian weights (see the module docstring).

    Args:
      fn: maps a batch of tiles [n, th, tw, C] to [n, th * scale, tw * scale, C'] (NHWC, any value range).
      x: [B, H, W, C] input (numpy or jax, any range; the caller states it).
      tile: tile size (``int`` or ``(th, tw)``) in input pixels; clipped to the input size, so a small input is
        one call of ``fn`` on the whole of it (bit-identical to calling ``fn`` directly).
      overlap: minimum overlap of neighbouring tiles, in input pixels.
      scale: output size / input size of ``fn`` (8 for a VAE decoder, 1/8 for an encoder, 1 for the UNet step).
      align: tile starts are multiples of this (use 8 for pixel-space tiles of an encoder).
      tiles_per_call: tiles stacked into one batch per call of ``fn`` (a batch of ``tiles_per_call * B``); the
        last batch is padded by repeating a tile so that every call has one shape.
      var: relative variance of the Gaussian weights.
      progress: called with 1 after each call of ``fn`` (:func:`tile_calls` of them).

    Returns:
      numpy float32 [B, H * scale, W * scale, C'].
    """
    x_shape = tuple(x.shape)
    if len(x_shape) != 4:
        raise ValueError(f"tiled_map wants NHWC input [B, H, W, C], got shape {x_shape}")
    b, h, w, _ = x_shape
    scale = Fraction(scale).limit_denominator(64)
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    th, tw = min(th, h), min(tw, w)
    if th >= h and tw >= w:  # one tile: no blending, no host round trip of the input
        out = np.asarray(fn(x), np.float32)
        if progress is not None:
            progress(1)
        return out
    # An overlap as large as the (clipped) tile would leave no stride: keep at least one aligned step.
    ys = tile_starts(h, th, max(0, min(overlap, th - align)), align)
    xs = tile_starts(w, tw, max(0, min(overlap, tw - align)), align)
    oth, otw = scaled(th, scale, "tile height"), scaled(tw, scale, "tile width")
    oh, ow = scaled(h, scale, "height"), scaled(w, scale, "width")
    weight = gaussian_weights(oth, otw, var)[None, :, :, None]
    acc: np.ndarray | None = None
    norm = np.zeros((1, oh, ow, 1), np.float32)
    boxes = [(y, xx) for y in ys for xx in xs]
    k = max(1, int(tiles_per_call))
    for g in range(0, len(boxes), k):
        group = boxes[g:g + k]
        padded = group + [group[-1]] * (k - len(group)) if len(boxes) > k else group
        batch = [x[:, y:y + th, xx:xx + tw] for y, xx in padded]
        stacked = batch[0] if len(batch) == 1 else (
            jnp.concatenate(batch, 0) if isinstance(x, jax.Array) else np.concatenate(batch, 0))
        out = np.asarray(fn(stacked), np.float32)
        if out.shape[0] != b * len(padded) or out.shape[1:3] != (oth, otw):
            raise ValueError(f"tiled_map: fn mapped tiles {tuple(stacked.shape)} to {out.shape}, "
                             f"expected [{b * len(padded)}, {oth}, {otw}, C] for scale {scale}")
        if acc is None:
            acc = np.zeros((b, oh, ow, out.shape[-1]), np.float32)
        for j, (y, xx) in enumerate(group):
            oy, ox = scaled(y, scale, "tile start"), scaled(xx, scale, "tile start")
            acc[:, oy:oy + oth, ox:ox + otw] += out[j * b:(j + 1) * b] * weight
            norm[:, oy:oy + oth, ox:ox + otw] += weight
        if progress is not None:
            progress(1)
    acc /= norm  # in place: the output is the image's size, one copy fewer
    return acc


def tiled_encode(encode_fn: ArrayFn, x: jax.Array | np.ndarray, tile: int, overlap: int,
                 tiles_per_call: int = 1, factor: int = 8,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """VAE encode in pixel tiles: ``encode_fn`` maps [n, th, tw, 3] images in [-1, 1] to [n, th/8, tw/8, c]
    latents; ``x`` [B, H, W, 3] in [-1, 1] with H, W multiples of ``factor``; ``tile`` and ``overlap`` in
    pixels (rounded down / up to multiples of ``factor``). Returns latents [B, H/8, W/8, c] (float32)."""
    tile = max(factor, tile - tile % factor)
    overlap = -(-overlap // factor) * factor
    return tiled_map(encode_fn, x, tile, overlap, scale=Fraction(1, factor), align=factor,
                     tiles_per_call=tiles_per_call, progress=progress)


def tiled_decode(decode_fn: ArrayFn, z: jax.Array | np.ndarray, tile: int, overlap: int,
                 tiles_per_call: int = 1, factor: int = 8,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """VAE decode in latent tiles: ``decode_fn`` maps [n, th, tw, c] latents to [n, 8 th, 8 tw, 3] images;
    ``z`` [B, h, w, c]; ``tile`` and ``overlap`` in latent pixels. Returns [B, 8h, 8w, 3] (float32, the decoder's
    range: [-1, 1] for SD)."""
    return tiled_map(decode_fn, z, tile, overlap, scale=factor, tiles_per_call=tiles_per_call, progress=progress)


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad NHWC ``x`` at the bottom and right to multiples of ``multiple`` by mirror reflection (edge replication
    where the image is too small to reflect). Returns the padded array and the original ``(H, W)``."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    # 'reflect' needs pad < size per axis; tiny images fall back to replicating the edge.
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(np.asarray(x), ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode), (h, w)


def crop_to(x: np.ndarray | jax.Array, size: tuple[int, int]) -> np.ndarray | jax.Array:
    """The top-left ``size = (H, W)`` of NHWC ``x`` (undoes :func:`pad_to_multiple` after any integer scale)."""
    return x[:, :size[0], :size[1]]
