"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by pytorch-fid) in Flax linen, NHWC.

FID is only comparable across papers when computed with this exact network: torchvision's Inception-v3 layout
with the weights file ``pt_inception-2015-12-05-6726825d.pth`` and four structural differences from torchvision's
own model, all of which are here:

* the 3x3 average pools inside the A, C and first E blocks (``Mixed_5b..5d``, ``Mixed_6b..6e``, ``Mixed_7b``) do
  not count the zero padding (TensorFlow's ``AVG_POOL`` with ``SAME`` padding);
* the pool branch of the last block (``Mixed_7c``) is a 3x3 *max* pool, stride 1, padding 1;
* 1008 classes (the head is not used for FID and is ignored on loading);
* inputs: images in [0, 1] are resized to 299x299 (bilinear, half-pixel centres, no antialiasing: PyTorch's
  ``F.interpolate(..., align_corners=False)``) and mapped to [-1, 1].

Every convolution is torchvision's ``BasicConv2d``: conv without bias, BatchNorm (eps 1e-3, inference statistics)
and ReLU. Parameter paths follow the PyTorch module names (``Mixed_6b/branch7x7_2/conv/kernel``,
``.../bn/{scale,bias,mean,var}``), so the converter is a renaming plus OIHW -> HWIO.

Features: ``dims`` selects pytorch-fid's output block, spatially averaged: 64 (after the first max pool),
192 (second max pool), 768 (``Mixed_6e``) or 2048 (the final average pool, the standard FID features).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jsr.models.common import abstract_params
from jsr.models.layers import Conv
from jsr.weights import convert, io

FID_SIZE = 299
BN_EPS = 1e-3
FEATURE_DIMS = (64, 192, 768, 2048)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BatchNormInference(nn.Module):
    """BatchNorm with frozen statistics (PyTorch ``eval()``): ``(x - mean) / sqrt(var + eps) * scale + bias``.

    The running statistics are ordinary parameters (``mean``, ``var``), so the whole network is one pytree.
    Computes in float32; returns the input's dtype.
    """

    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def p(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32)

        scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
        mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
        k = scale * jax.lax.rsqrt(var + self.epsilon)
        y = (x.astype(jnp.float32) - mean) * k + bias
        return y.astype(x.dtype)


class BasicConv(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU. NHWC in and out."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # PyTorch's (pad_h, pad_w), both sides
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = Conv(self.features, self.kernel_size, self.strides, ((ph, ph), (pw, pw)), use_bias=False,
                 dtype=self.dtype, name="conv")(x)
        return nn.relu(BatchNormInference(name="bn")(x))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TensorFlow's SAME average pool: border windows average only the pixels that exist.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))  # pads with -inf


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b..5d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + ``pool_features``."""

    pool_features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + input channels."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b..6e``) -> 768 channels."""

    channels_7x7: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + input."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches (``Mixed_7b``, ``Mixed_7c``) -> 2048 channels.

    ``pool``: ``"avg"`` (padding excluded) for ``Mixed_7b``, ``"max"`` for ``Mixed_7c`` (the FID graph's quirk).
    """

    pool: str = "avg"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = functools.partial(BasicConv, dtype=self.dtype)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3_same(x) if self.pool == "max" else _avg_pool_3x3_same(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 trunk up to the requested feature block.

    Attributes:
      dims: feature width, one of :data:`FEATURE_DIMS` (2048 for standard FID); the network stops at that block.
      dtype: compute dtype (``None``: the input's); BatchNorm and the final average are float32.
    Input: [N, H, W, 3] in **[-1, 1]**, NHWC, H, W >= 75 (299 for FID: see :func:`inception_features`, which
    resizes and rescales [0, 1] images).
    Output: [N, dims] float32, the block's output averaged over space.
    """

    dims: int = 2048
    dtype: Any = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, FID_SIZE, FID_SIZE, 3), jnp.float32),)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dims not in FEATURE_DIMS:
            raise ValueError(f"FIDInceptionV3: dims must be one of {FEATURE_DIMS}, got {self.dims}")
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 75:
            raise ValueError(f"FIDInceptionV3: want [N, H, W, 3] with H, W >= 75, got {x.shape}")
        c = functools.partial(BasicConv, dtype=self.dtype)
        x = c(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        if self.dims > 64:
            x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
            x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
            x = _max_pool_3x3_s2(x)
        if self.dims > 192:
            x = InceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)
            x = InceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)
            x = InceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)
            x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
            for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
                x = InceptionC(c7, dtype=self.dtype, name=name)(x)
        if self.dims > 768:
            x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
            x = InceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
            x = InceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] float32 weights of PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis: sample ``i`` reads input coordinate ``max((i + 0.5) * in / out - 0.5, 0)`` between its two
    neighbours (the upper one clamped to the last pixel). No antialiasing when shrinking, as in pytorch-fid."""
    # PyTorch's CPU kernel computes the source coordinate in float32 as one fused multiply-add; float64 (or
    # unfused float32) arithmetic moves it by up to an ulp of the coordinate, i.e. pixel values by up to ~3e-5
    # for large inputs. Emulating the FMA (exact product, one rounding) keeps us on PyTorch's numbers (~5e-8).
    f32 = np.float32
    scale = f32(in_len) / f32(out_len)
    centre = np.arange(out_len, dtype=f32) + f32(0.5)
    src = (np.float64(scale) * centre.astype(np.float64) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    hi = np.minimum(lo + 1, in_len - 1)
    frac = (src - lo.astype(f32)).astype(np.float64)
    m = np.zeros((out_len, in_len), np.float64)
    np.add.at(m, (np.arange(out_len), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_len), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int] = (FID_SIZE, FID_SIZE)) -> jax.Array:
    """Resize [N, H, W, C] images with PyTorch's bilinear ``align_corners=False`` rule (any value range)."""
    mh = jnp.asarray(bilinear_matrix(x.shape[1], size[0]))
    mw = jnp.asarray(bilinear_matrix(x.shape[2], size[1]))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", mh, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=hi)


@functools.partial(jax.jit, static_argnames=("dims", "resize", "dtype", "precision"))
def inception_features(params: Mapping, images: jax.Array, *, dims: int = 2048, resize: bool = True,
                       dtype: Any = None, precision: str | None = "highest") -> jax.Array:
    """FID features of images in **[0, 1]**, as pytorch-fid computes them.

    Args:
      params: :class:`FIDInceptionV3` parameters (see :func:`load_inception_params`); a full set works for any
        ``dims``.
      images: [N, H, W, 3] in [0, 1], NHWC.
      dims: 64, 192, 768 or 2048 (standard FID).
      resize: resize to 299x299 first (pytorch-fid always does); without it H, W must be >= 75.
      dtype: trunk compute dtype (``None``: float32).
      precision: matmul/conv precision while tracing; ``"highest"`` keeps accelerators from running the f32 convs
        in TF32/bf16.
    Returns:
      [N, dims] float32.
    """
    x = images.astype(jnp.float32)
    if resize:
        x = resize_bilinear(x)
    x = 2.0 * x - 1.0
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        return FIDInceptionV3(dims=dims, dtype=dtype).apply({"params": params}, x)


# ---------------------------------------------------------------------------------------------------------------
# Weights

_LEAF_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight", ("bn", "bias"): "bn.bias",
                  ("bn", "mean"): "bn.running_mean", ("bn", "var"): "bn.running_var"}
# The classifier (1008 classes), torchvision's auxiliary head and BatchNorm's step counters play no part in FID.
_IGNORED = ("fc.", "AuxLogits.")


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    # Tracing the whole network at 299x299 takes seconds; the answer never changes.
    flat = traverse_util.flatten_dict(abstract_params(FIDInceptionV3()))
    return {path: tuple(v.shape) for path, v in flat.items()}


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[:-2]) + "." + _LEAF_TO_TORCH[path[-2:]]


def inception_params_from_torch(state: Mapping[str, np.ndarray], *, dtype: Any = jnp.float32) -> dict:
    """PyTorch tensors (torchvision/pytorch-fid Inception-v3 names) -> :class:`FIDInceptionV3` parameters.

    ``state`` holds ``Conv2d_1a_3x3.conv.weight`` [O, I, kh, kw], ``Conv2d_1a_3x3.bn.{weight, bias,
    running_mean, running_var}`` and so on for all 94 convolutions. ``fc.*``, ``AuxLogits.*`` and
    ``*.num_batches_tracked`` are ignored; anything else missing, unexpected or mis-shaped raises
    ``CheckpointMismatchError`` naming it.
    """
    shapes = _expected_shapes()
    expected = {_torch_key(path): path for path in shapes}
    given = {k: v for k, v in state.items()
             if not k.startswith(_IGNORED) and not k.endswith(".num_batches_tracked")}
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
    out = {}
    for key, path in expected.items():
        if key not in given:
            continue
        v = np.asarray(given[key])
        want = shapes[path]
        if path[-1] == "kernel":
            v = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v
        if tuple(v.shape) != want:
            problems.append(f"tensor {key!r} has shape {tuple(np.shape(given[key]))}, the model expects "
                            f"{(want[3], want[2], want[0], want[1]) if len(want) == 4 else want}")
            continue
        out[path] = jnp.asarray(v, dtype=dtype)
    if problems:
        raise convert.CheckpointMismatchError("FID Inception-v3 checkpoint does not match the model: "
                                              + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_inception_params(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> dict:
    """:class:`FIDInceptionV3` parameters from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read
    with torch, imported only then) or a safetensors file with the same keys (e.g. from
    :func:`save_inception_weights`, which then loads without torch)."""
    return inception_params_from_torch(io.read_state_dict(path), dtype=dtype)


def save_inception_weights(params: Mapping, path: str | os.PathLike) -> None:
    """Write :class:`FIDInceptionV3` parameters as a PyTorch-layout safetensors file (pytorch-fid's names, OIHW
    kernels, without the unused classifier) that :func:`load_inception_params` reads back without torch."""
    state = {}
    for p, v in traverse_util.flatten_dict(convert.unbox(params)).items():
        v = np.asarray(v)
        state[_torch_key(p)] = np.require(v.transpose(3, 2, 0, 1) if p[-1] == "kernel" else v, requirements="C")
    io.write_safetensors(path, state)
