"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity").

The reference and the distorted image go through VGG16 with L2 pooling (:class:`jsr.metrics.vgg.VGG16Features`,
``pooling="l2"``) after ImageNet mean/std normalisation; the input image itself is the first of six "stages"
(channels 3, 64, 128, 256, 512, 512; 1475 in all). For each channel ``i`` of stage ``j``, with spatial means
``mx, my``, variances ``vx, vy`` and covariance ``cxy``:

  texture   ``l = (2 mx my + c1) / (mx^2 + my^2 + c1)``
  structure ``s = (2 cxy + c2) / (vx + vy + c2)``,   c1 = c2 = 1e-6

and ``DISTS = 1 - sum_ij (alpha_ij l_ij + beta_ij s_ij)`` with the learned non-negative ``alpha``, ``beta``
normalised to sum 1 together. 0 for identical images; larger is worse.

Range and layout: images in [0, 1], NHWC. Weights: torchvision's VGG16 (``features.N.*``) plus the official
``DISTS_pytorch/weights.pt`` (``alpha``, ``beta``: [1, 1475, 1, 1]), as ``.pth``/``.pt`` (needs torch) or
safetensors with the same keys; :func:`save_dists_weights` writes one safetensors file holding both.
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

from jsr.metrics.vgg import INDEXED, VGG16Features, vgg16_params_from_torch
from jsr.weights import convert, io

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STAGE_CHANNELS = (3, 64, 128, 256, 512, 512)
N_WEIGHTS = sum(STAGE_CHANNELS)
C1 = 1e-6
C2 = 1e-6


def _weight_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    # DISTS' own starting point before training: N(0.1, 0.01).
    return 0.1 + 0.01 * jax.random.normal(key, shape, dtype)


class DISTS(nn.Module):
    """DISTS between two batches of images in [0, 1].

    Attributes:
      dtype: compute dtype of the VGG trunk (``None``: the input's); statistics are float32.
    Inputs: ``x`` (reference), ``y`` (distorted), [N, H, W, 3] in [0, 1], H, W >= 16.
    Output: [N] float32 scores (0 for identical images).
    Parameters: ``{"net": VGG16Features params, "alpha": [1475], "beta": [1475]}``.
    """

    dtype: Any = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        z = jnp.zeros((batch, 32, 32, 3), jnp.float32)
        return z, z

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"DISTS: want two [N, H, W, 3] batches of equal shape, got {x.shape} and {y.shape}")
        alpha = self.param("alpha", _weight_init, (N_WEIGHTS,))
        beta = self.param("beta", _weight_init, (N_WEIGHTS,))
        n = x.shape[0]
        xy = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
        h = (xy - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)
        feats = (xy,) + VGG16Features(pooling="l2", dtype=self.dtype, name="net")(h)
        w_sum = jnp.sum(alpha) + jnp.sum(beta)
        splits = np.cumsum(STAGE_CHANNELS)[:-1]
        alphas = jnp.split(alpha.astype(jnp.float32) / w_sum, splits)
        betas = jnp.split(beta.astype(jnp.float32) / w_sum, splits)
        score = jnp.zeros((n,), jnp.float32)
        for f, a, b in zip(feats, alphas, betas):
            f = f.astype(jnp.float32)
            fx, fy = f[:n], f[n:]
            mx = jnp.mean(fx, axis=(1, 2))
            my = jnp.mean(fy, axis=(1, 2))
            texture = (2 * mx * my + C1) / (jnp.square(mx) + jnp.square(my) + C1)
            # Centred moments (the paper's definition); the official code's E[xy] - mx my is the same algebra
            # with more cancellation in float32.
            dx = fx - mx[:, None, None]
            dy = fy - my[:, None, None]
            vx = jnp.mean(jnp.square(dx), axis=(1, 2))
            vy = jnp.mean(jnp.square(dy), axis=(1, 2))
            cxy = jnp.mean(dx * dy, axis=(1, 2))
            structure = (2 * cxy + C2) / (vx + vy + C2)
            score = score + texture @ a + structure @ b
        return 1.0 - score


def dists_distance(params: Mapping, x: jax.Array, y: jax.Array, *, dtype: Any = None,
                   precision: str | None = "highest") -> jax.Array:
    """DISTS between reference ``x`` and distorted ``y``, images in [0, 1].

    Args:
      params: :class:`DISTS` parameters (see :func:`load_dists_params`).
      x, y: [N, H, W, 3] (or one [H, W, 3] image) in [0, 1], NHWC, H, W >= 16.
      dtype: trunk compute dtype (``None``: float32 or the inputs' dtype).
      precision: matmul/conv precision while tracing (``jax.default_matmul_precision``); ``"highest"``
        keeps GPUs/TPUs from running the f32 convs in TF32/bf16 (10 or 7 mantissa bits; not measured
        here, no accelerator).
        ``None`` leaves the global setting (a training loss may prefer speed).
    Returns:
      [N] float32 scores (a scalar for unbatched input); differentiable and jit-able.
    """
    single = x.ndim == 3
    if single:
        x, y = x[None], y[None]
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        d = DISTS(dtype=dtype).apply({"params": params}, x, y)
    return d[0] if single else d


_STAGE_KEY = re.compile(r"^stage\d\.(\d+)\.(weight|bias)$")


def dists_params_from_torch(state: Mapping[str, np.ndarray], *, dtype: Any = jnp.float32) -> dict:
    """PyTorch tensors -> :class:`DISTS` parameters.

    ``state`` holds the 13 VGG16 convs, as torchvision's ``features.N.weight``/``bias`` or a ``DISTS_pytorch``
    module's ``stageS.N.weight``/``bias``, plus ``alpha`` and ``beta`` ([1, 1475, 1, 1] or [1475]). Other keys
    (``classifier.*``, the L2-pooling ``filter`` and ``mean``/``std`` buffers) are ignored.
    Raises ``CheckpointMismatchError`` naming what is missing or mis-shaped.
    """
    vgg_state = {}
    for k, v in state.items():
        m = _STAGE_KEY.match(k)
        vgg_state[f"features.{m.group(1)}.{m.group(2)}" if m else k] = v
    params: dict[str, Any] = {"net": vgg16_params_from_torch(vgg_state, dtype=dtype)}
    problems = []
    for name in ("alpha", "beta"):
        if name not in state:
            problems.append(f"missing tensor {name!r}")
            continue
        v = np.asarray(state[name])
        if v.size != N_WEIGHTS or any(s != 1 for s in v.shape if s != N_WEIGHTS):
            problems.append(f"tensor {name!r} has shape {v.shape} but DISTS expects (1, {N_WEIGHTS}, 1, 1)")
            continue
        params[name] = jnp.asarray(v.reshape(N_WEIGHTS), dtype=dtype)
    if problems:
        raise convert.CheckpointMismatchError("DISTS checkpoint does not match the model: " + "; ".join(problems))
    return params


def load_dists_params(*paths: str | os.PathLike, dtype: Any = jnp.float32) -> dict:
    """:class:`DISTS` parameters from weight files, merged in order.

    Typical call: ``load_dists_params("vgg16-397923af.pth", "DISTS_pytorch/weights.pt")``; each file may be
    ``.pth``/``.pt`` (read with torch, imported only then), ``.safetensors`` with the same keys, or one file
    written by :func:`save_dists_weights`.
    """
    state: dict[str, np.ndarray] = {}
    for p in paths:
        state.update(io.read_state_dict(p))
    return dists_params_from_torch(state, dtype=dtype)


def save_dists_weights(params: Mapping, path: str | os.PathLike) -> None:
    """Write :class:`DISTS` parameters as one PyTorch-layout safetensors file (``features.N.weight``...,
    ``alpha``/``beta`` as [1, 1475, 1, 1]) that :func:`load_dists_params` reads back without torch."""
    state = convert.params_to_torch_state(params["net"], INDEXED)
    for name in ("alpha", "beta"):
        state[name] = np.asarray(params[name]).reshape(1, N_WEIGHTS, 1, 1)
    io.write_safetensors(path, state)
