"""Primitive layers shared by every jsr model: Dense, Conv, GroupNorm, LayerNorm.

Why our own instead of ``flax.linen.Dense``/``Conv``:

* **LoRA hook.** Each Dense/Conv looks for a ``lora`` variable collection at its own scope. When the caller
  passes ``module.apply({"params": base, "lora": tree}, ...)`` and ``tree`` has ``{"a", "b"}`` at this layer's
  path, the layer adds the low-rank branch ``(x A) B``. The base parameters are never touched, so one copy of
  the base serves the frozen model and any number of LoRA trees inside one jitted function.
  ``b`` is the *runtime* factor: already multiplied by the LoRA scale ``alpha / rank`` (``jsr.models.lora``
  builds runtime trees), so layers need no per-LoRA metadata and stacked LoRAs are plain concatenations.
* **Logical axis names** on every parameter (``nn.with_logical_partitioning``) so sharding rules can map them
  onto a mesh; ``jsr.models.common.logical_axes`` reads them back.
* **Precision.** ``dtype`` is the compute dtype (bf16 on accelerators); parameters may be stored in another
  dtype. Norms always compute their statistics in float32.

Layouts: activations NHWC / [..., features]; conv kernels HWIO; dense kernels [in, out].
LoRA factors: dense ``a`` [in, r], ``b`` [r, out]; conv ``a`` [kh, kw, in, r] (same stride/padding as the base),
``b`` [1, 1, r, out] (a 1x1 conv), matching peft's Conv2d LoRA.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

LORA_COLLECTION = "lora"


def _param(module: nn.Module, name: str, init, axes: Axes, shape: Sequence[int], dtype: Dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def _lora_factors(module: nn.Module) -> tuple[jax.Array, jax.Array] | None:
    if module.has_variable(LORA_COLLECTION, "a"):
        return module.get_variable(LORA_COLLECTION, "a"), module.get_variable(LORA_COLLECTION, "b")
    return None


class Dense(nn.Module):
    """``y = x W + b`` on the last axis, plus an optional LoRA branch.

    Args (attributes):
      features: output width.
      use_bias: add a bias.
      dtype: compute dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of freshly initialised parameters (loaded ones keep theirs).
      kernel_axes: logical names of the kernel's (in, out) axes.
    Input ``x``: [..., in] -> [..., features].
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_axes: Axes = ("embed", "mlp")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), self.kernel_axes,
                        (x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.dot(x, kernel.astype(dtype))
        lora = _lora_factors(self)
        if lora is not None:
            a, b = lora
            y = y + jnp.dot(jnp.dot(x, a.astype(dtype)), b.astype(dtype))
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, (self.kernel_axes[-1],), (self.features,),
                          self.param_dtype)
            y = y + bias.astype(dtype)
        return y


Padding = str | Sequence[tuple[int, int]]


# Small feature maps with many channels run their convs as one matmul over the kh*kw shifted copies (im2col)
# when XLA:CPU's YNNPACK convolution fusion is on (XLA's default): measured on the 2-core CPU (2026-11-23), a 3x3
# conv at 8x8x1280 took 103 ms through it and 46 ms as im2col (the SD-2.1 UNet forward at 512 px gained 10-17 %).
# With that fusion off (jsr's command lines, jsr.cli.CPU_FAST_COMPILE) XLA's conv ties with im2col from 8x8x32 to
# 16x16x1280 (2026-11-30), and below 128 channels im2col never won by more than the noise under either setting.
# It is not free where it does not pay: kh*kw slices, a concatenate and a dot are ~11 thunks instead of one, and
# XLA:CPU's loader is quadratic in a program's thunks (the tiny CTSR step: 12,560 thunks, 2,600 of them im2col).
# The command lines pass the same flags on GPU and TPU, so there too XLA's own conv runs.
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 128


@functools.lru_cache(maxsize=8)
def _ynn_convolution_fusion_on(xla_flags: str) -> bool:
    """False when ``xla_flags`` turn XLA:CPU's YNNPACK convolution fusion off (``-individual_convolution``)."""
    types = re.findall(r"--xla_cpu_experimental_ynn_fusion_type=(\S*)", xla_flags)
    return not (types and "-individual_convolution" in types[-1].split(","))


def im2col_pays(pixels: int, channels: int) -> bool:
    """Whether a conv over a ``pixels``-pixel map with ``channels`` input channels takes the im2col path."""
    return (pixels <= IM2COL_MAX_PIXELS and channels >= IM2COL_MIN_CHANNELS
            and _ynn_convolution_fusion_on(os.environ.get("XLA_FLAGS", "")))


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    (pt, pb), (pl, pr) = padding
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (x.shape[1] + pt + pb - kh) // sh + 1
    ow = (x.shape[2] + pl + pr - kw) // sw + 1
    cols = jnp.concatenate([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols, kernel.reshape(kh * kw * cin, kernel.shape[-1]))


class Conv(nn.Module):
    """2-D convolution, NHWC input, HWIO kernel, plus an optional conv LoRA branch.

    ``padding`` is ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``; PyTorch's
    ``padding=p`` is ``((p, p), (p, p))``. Input [N, H, W, C] -> [N, H', W', features].
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_axes: Axes = (None, None, "conv_in", "conv_out")

    def _conv(self, x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
        if not isinstance(padding, str) and im2col_pays(x.shape[1] * x.shape[2], x.shape[-1]):
            return _im2col_conv(x, kernel, strides, padding)
        pad = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=tuple(strides), padding=pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), self.kernel_axes,
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if (kh, kw) == (1, 1) and tuple(self.strides) == (1, 1) and self.padding in ("SAME", "VALID",
                                                                                        ((0, 0), (0, 0))):
            # A 1x1 conv is a matmul; XLA's dot is faster than its conv path on CPU.
            y = jnp.dot(x, kernel.astype(dtype)[0, 0])
        else:
            y = self._conv(x, kernel.astype(dtype), self.strides, self.padding)
        lora = _lora_factors(self)
        if lora is not None:
            a, b = lora
            low = self._conv(x, a.astype(dtype), self.strides, self.padding)
            y = y + jnp.dot(low, b.astype(dtype).reshape(b.shape[-2], b.shape[-1]))
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, (self.kernel_axes[-1],), (self.features,),
                          self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def group_moments(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-sample, per-group mean and (biased) variance of NHWC or [N, L, C] ``x``, float32, each [N, G]."""
    c = x.shape[-1]
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, c // num_groups)
    mean = jnp.mean(xf, axis=(1, 3))
    var = jnp.mean(jnp.square(xf - mean[:, None, :, None]), axis=(1, 3))
    return mean, var


def group_normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float, dtype: Dtype | None = None) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` with group statistics ``mean``/``var`` [N, G] (from
    :func:`group_moments`, or whole-image statistics gathered tile by tile), computed in float32.

    ``x`` NHWC or [N, L, C] with C divisible by G; ``scale``/``bias`` [C]. Output dtype ``dtype`` or ``x``'s."""
    shape, c = x.shape, x.shape[-1]
    g = mean.shape[-1]
    xf = x.astype(jnp.float32).reshape(shape[0], -1, g, c // g)
    xf = (xf - mean[:, None, :, None]) * jax.lax.rsqrt(var[:, None, :, None] + epsilon)
    xf = xf.reshape(shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return xf.astype(dtype or x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or [N, L, C]) with statistics in float32, as PyTorch's ``nn.GroupNorm``.

    Output dtype is ``dtype`` or the input's.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = _param(self, "scale", nn.initializers.ones, ("norm",), (c,), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, ("norm",), (c,), self.param_dtype)
        mean, var = group_moments(x, self.num_groups)
        return group_normalize(x, mean, var, scale, bias, self.epsilon, self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm on the last axis with float32 statistics, as PyTorch's ``nn.LayerNorm``."""

    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, ("norm",), (c,), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, ("norm",), (c,), self.param_dtype)
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (xf * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype)
