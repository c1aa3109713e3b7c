"""LPIPS-VGG (Zhang et al. 2018, v0.1), as a differentiable loss and as a metric.

``d(x0, x1) = sum_k mean_hw( w_k . (n(f_k(x0)) - n(f_k(x1)))^2 )`` where ``f_k`` are the five VGG16 ReLU taps of
the scaled input, ``n`` unit-normalises each feature vector over channels and ``w_k`` are the learned
non-negative 1x1 "linear heads" (no bias). The scaling layer maps [-1, 1] images to roughly ImageNet statistics:
``(x - shift) / scale`` with shift (-.030, -.088, -.188), scale (.458, .448, .450).

Ranges: the :class:`LPIPS` module takes images in [-1, 1] (LPIPS' own convention, and jsr's inside models);
:func:`lpips_distance` is the metric/loss boundary and takes [0, 1]. Layout NHWC throughout.

Weights: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``: ``features.N.weight``/``bias``) and the ``lpips``
package's head file (``weights/v0.1/vgg.pth``: ``lin0.model.1.weight`` ... ``lin4.model.1.weight``), as ``.pth``
(needs torch) or the same state dicts saved as ``.safetensors``; :func:`save_lpips_weights` writes one
safetensors file holding both that loads without torch.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.metrics.vgg import INDEXED, VGG16Features
from jsr.models.common import abstract_params
from jsr.models.layers import Conv
from jsr.weights import convert, io

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def unit_normalize(f: jax.Array, eps: float = _EPS) -> jax.Array:
    """``f / (||f||_2 + eps)`` over the channel (last) axis, as LPIPS' ``normalize_tensor``.

    The norm uses the double-``where`` form so that an all-zero feature vector (a dead ReLU pixel) has a zero,
    not NaN, gradient: the plain ``sqrt`` has an infinite derivative at 0.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG between two batches of images in [-1, 1].

    Attributes:
      dtype: compute dtype of the VGG trunk (``None``: the input's; bf16 is fine for a training loss). The
        normalisation, heads and averages always run in float32.
    Inputs: ``x0``, ``x1`` [N, H, W, 3] in [-1, 1] (H, W >= 16 so that every block sees at least one pixel).
    Output: [N] float32 distances (0 for identical images).
    Parameters: ``{"net": VGG16Features params, "lin0".."lin4": {"kernel": [1, 1, C_k, 1]}}``.
    """

    dtype: Any = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        z = jnp.zeros((batch, 32, 32, 3), jnp.float32)
        return z, z

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS: want two [N, H, W, 3] batches of equal shape, got {x0.shape} and {x1.shape}")
        n = x0.shape[0]
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        # One trunk call on the stacked pair: half the dispatches, the same result up to rounding (a backend may
        # sum the two halves' products in different orders: LPIPS(x, x) ~ 1e-16 on XLA:CPU).
        h = (jnp.concatenate([x0, x1], axis=0).astype(jnp.float32) - shift) / scale
        taps = VGG16Features(pooling="max", dtype=self.dtype, name="net")(h)
        total = jnp.zeros((n,), jnp.float32)
        for k, f in enumerate(taps):
            f = f.astype(jnp.float32)
            d = jnp.square(unit_normalize(f[:n]) - unit_normalize(f[n:]))
            s = Conv(1, (1, 1), padding="VALID", use_bias=False, dtype=jnp.float32, name=f"lin{k}")(d)
            total = total + jnp.mean(s, axis=(1, 2, 3))
        return total


def lpips_distance(params: Mapping, x: jax.Array, y: jax.Array, *, dtype: Any = None,
                   precision: str | None = "highest") -> jax.Array:
    """LPIPS-VGG between ``x`` and ``y``, images in **[0, 1]** (the metric/loss boundary).

    Args:
      params: :class:`LPIPS` parameters (see :func:`load_lpips_params`).
      x, y: [N, H, W, 3] (or one [H, W, 3] image) in [0, 1], NHWC.
      dtype: trunk compute dtype (``None``: float32 or the inputs' dtype).
      precision: matmul/conv precision while tracing (``jax.default_matmul_precision``); ``"highest"``
        keeps GPUs/TPUs from running the f32 convs in TF32/bf16 (10 or 7 mantissa bits; not measured
        here, no accelerator).
        ``None`` leaves the global setting (a training loss may prefer speed).
    Returns:
      [N] float32 distances (a scalar for unbatched input). Differentiable and jit-able; use
      ``jnp.mean(lpips_distance(...))`` as a loss.
    """
    single = x.ndim == 3
    if single:
        x, y = x[None], y[None]
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        d = LPIPS(dtype=dtype).apply({"params": params}, 2.0 * x - 1.0, 2.0 * y - 1.0)
    return d[0] if single else d


class LPIPSSpatial(nn.Module):
    """LPIPS-VGG as a per-pixel map (the ``lpips`` package's ``LPIPS(net="vgg", spatial=True)``).

    Each tap's head output ``w_k . (n(f_k(x0)) - n(f_k(x1)))^2`` [N, h_k, w_k, 1] is resized to the input size
    bilinearly with half-pixel centres and no anti-aliasing (``nn.Upsample(size, mode="bilinear",
    align_corners=False)``) and the five maps are summed. Same parameters as :class:`LPIPS`.

    Inputs: ``x0``, ``x1`` [N, H, W, 3] in [-1, 1]. Output: [N, H, W, 1] float32 (non-negative).
    """

    dtype: Any = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        z = jnp.zeros((batch, 32, 32, 3), jnp.float32)
        return z, z

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS: want two [N, H, W, 3] batches of equal shape, got {x0.shape} and {x1.shape}")
        n, h, w = x0.shape[:3]
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        hh = (jnp.concatenate([x0, x1], axis=0).astype(jnp.float32) - shift) / scale
        taps = VGG16Features(pooling="max", dtype=self.dtype, name="net")(hh)
        total = jnp.zeros((n, h, w, 1), jnp.float32)
        for k, f in enumerate(taps):
            f = f.astype(jnp.float32)
            d = jnp.square(unit_normalize(f[:n]) - unit_normalize(f[n:]))
            s = Conv(1, (1, 1), padding="VALID", use_bias=False, dtype=jnp.float32, name=f"lin{k}")(d)
            if s.shape[1:3] != (h, w):
                # antialias=False: PyTorch's bilinear upsampling (it only ever enlarges here) samples, never averages.
                s = jax.image.resize(s, (n, h, w, 1), method="bilinear", antialias=False)
            total = total + s
        return total


def lpips_spatial(params: Mapping, x: jax.Array, y: jax.Array, *, dtype: Any = None,
                  precision: str | None = "highest") -> jax.Array:
    """Per-pixel LPIPS-VGG map between ``x`` and ``y``, images in **[0, 1]** (as :func:`lpips_distance`).

    Args:
      params: :class:`LPIPS` parameters (the same tree serves :class:`LPIPSSpatial`).
      x, y: [N, H, W, 3] (or one [H, W, 3] image) in [0, 1], NHWC; H, W >= 16.
      dtype: trunk compute dtype (``None``: float32 or the inputs' dtype).
      precision: as :func:`lpips_distance`.
    Returns:
      [N, H, W, 1] float32 (``[H, W, 1]`` for unbatched input): ``lpips.LPIPS(net="vgg", spatial=True)``'s
      [N, 1, H, W] map in NHWC. For H, W divisible by 16 its spatial mean is :func:`lpips_distance` (integer
      bilinear upsampling keeps means); otherwise only close. Differentiable and jit-able (FiDeSR's DAW-weighted
      LPIPS loss).
    """
    single = x.ndim == 3
    if single:
        x, y = x[None], y[None]
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        m = LPIPSSpatial(dtype=dtype).apply({"params": params}, 2.0 * x - 1.0, 2.0 * y - 1.0)
    return m[0] if single else m


_RENAMES = (
    (re.compile(r"^features\.(\d+)\.(weight|bias)$"), r"net.features.\1.\2"),  # torchvision vgg16
    (re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$"), r"net.features.\1.\2"),  # an lpips.LPIPS state dict
    (re.compile(r"^lin(\d)\.model\.\d\.weight$"), r"lin\1.weight"),  # lpips heads (with or without Dropout)
)
# ``lins.K.*`` is the same head tensor again in an lpips.LPIPS state dict (its ModuleList aliases linK).
_IGNORE = (r"^classifier\.", r"^scaling_layer\.", r"^lins\.\d\.")


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def lpips_params_from_torch(state: Mapping[str, np.ndarray], *, dtype: Any = jnp.float32) -> dict:
    """PyTorch tensors -> :class:`LPIPS` parameters.

    ``state`` must hold the 13 VGG16 convs and the five heads, under any mix of: torchvision's keys
    (``features.N.weight``; ``classifier.*`` ignored), an ``lpips.LPIPS`` module's keys (``net.sliceK.N.weight``,
    ``linK.model.1.weight``; ``scaling_layer.*`` and the duplicate ``lins.K.*`` ignored), or jsr's own export
    (``net.features.N.weight``, ``linK.weight``). Head tensors are [1, C, 1, 1]. Raises
    ``CheckpointMismatchError`` naming any missing, unexpected or mis-shaped tensor.
    """
    return convert.torch_state_to_params(state, abstract_params(LPIPS()), INDEXED, model="LPIPS-VGG",
                                         dtype=dtype, ignore=_IGNORE, rename=_rename)


def load_lpips_params(*paths: str | os.PathLike, dtype: Any = jnp.float32) -> dict:
    """:class:`LPIPS` parameters from weight files, merged in order.

    Typical call: ``load_lpips_params("vgg16-397923af.pth", "lpips/weights/v0.1/vgg.pth")``; each file may be
    ``.pth``/``.pt`` (read with torch, imported only then) or a ``.safetensors`` file with the same keys, or one
    file written by :func:`save_lpips_weights`.
    """
    state: dict[str, np.ndarray] = {}
    for p in paths:
        state.update(io.read_state_dict(p))
    return lpips_params_from_torch(state, dtype=dtype)


def save_lpips_weights(params: Mapping, path: str | os.PathLike) -> None:
    """Write :class:`LPIPS` parameters as one PyTorch-layout safetensors file (``net.features.N.weight``,
    ``linK.weight``) that :func:`load_lpips_params` reads back without torch."""
    io.write_safetensors(path, convert.params_to_torch_state(params, INDEXED))

