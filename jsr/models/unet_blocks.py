"""Building blocks of the SD 1.x/2.x UNet (``jsr.models.unet``), NHWC.

Every submodule is named after its diffusers attribute (list entries as ``name_N``: ``resnets_0``, ``to_out_0``,
``ff/net_0/proj``) so that ``jsr.weights.convert`` maps each parameter to its diffusers state-dict key with the
``UNET_INDEXED`` set of ``jsr.weights.unet``. All Dense/Conv layers are ``jsr.models.layers`` ones, so a LoRA tree
passed in the ``lora`` collection reaches every projection and convolution.

Activations are NHWC ``[B, H, W, C]`` (token sequences ``[B, L, C]``), in the compute ``dtype``; norms compute
their statistics in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.models import constraints
from jsr.models.attention import attention_with_probs, dot_product_attention
from jsr.models.layers import Conv, Dense, GroupNorm, LayerNorm
from jsr.models.lora import module_name

Dtype = Any

# Flax collection that captured cross-attention maps are sown into (see ``AttentionCapture``).
ATTENTION_MAPS = "attention_maps"
# The list containers on the path of a UNet attention layer: their ``name_N`` becomes ``name.N`` in PyTorch names.
ATTENTION_PATH_LISTS = frozenset({"down_blocks", "up_blocks", "attentions", "transformer_blocks"})


@dataclasses.dataclass(frozen=True)
class AttentionCapture:
    """Which cross-attention (``attn2``) layers record their probabilities; a hashable (static) module attribute.

    Attributes:
      patterns: PyTorch-style module-name substrings; a layer is selected when its name (relative to the UNet,
        e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``) contains any of them (``""`` selects all).
      root_depth: length of the UNet's own Flax path, stripped from a layer's path before naming it, so that
        the names do not depend on where the UNet sits inside a larger model.
    """

    patterns: tuple[str, ...]
    root_depth: int = 0

    def selects(self, path: Sequence[str]) -> bool:
        """Whether the attention layer at Flax ``path`` (absolute, as ``Module.path``) is selected."""
        name = module_name(tuple(path)[self.root_depth:], ATTENTION_PATH_LISTS)
        return any(p in name for p in self.patterns)


# Activation names diffusers' ``get_activation`` accepts, as jax functions. "gelu" is PyTorch's exact (erf) GELU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``get_timestep_embedding``.

    Args:
      timesteps: [B] float or int timesteps (any range; SD uses [0, 1000)).
      dim: embedding width.
      flip_sin_to_cos: order ``[cos, sin]`` (True, SD) instead of ``[sin, cos]``.
      freq_shift: diffusers' ``downscale_freq_shift``.
    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    # Same float32 operation order as PyTorch so that sin/cos of arguments near 1000 agree to the last bits.
    exponent = jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(max_period))
    freqs = jnp.exp(exponent / jnp.float32(half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(t_emb)))``: [B, in] -> [B, features]."""

    features: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.features, dtype=self.dtype, kernel_axes=("embed", "mlp"), name="linear_1")(x)
        x = ACTIVATIONS[self.act_fn](x)
        return Dense(self.features, dtype=self.dtype, kernel_axes=("mlp", "embed"), name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a time-embedding bias (diffusers ``ResnetBlock2D``, ``default`` time shift).

    ``(x' + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale_factor`` with ``x'`` the
    input, through a 1x1 ``conv_shortcut`` when the channel count changes. x [B, H, W, Cin], temb [B, T] ->
    [B, H, W, out_channels].
    """

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        t = Dense(self.out_channels, dtype=self.dtype, kernel_axes=("embed", "mlp"), name="time_emb_proj")(act(temb))
        h = h + t[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                     name="conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """3x3 stride-2 conv. ``padding`` is diffusers' ``downsample_padding``: 1 pads every side (SD), 0 pads
    bottom/right by one. [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C] (for padding 1)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((p, p), (p, p)) if p else ((0, 1), (0, 1))
        return Conv(self.channels, strides=(2, 2), padding=pad, dtype=self.dtype, name="conv")(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x`` to spatial ``size`` with PyTorch's ``F.interpolate(mode="nearest")``
    index rule (``src = floor(dst * in / out)``); an exact x2 is a broadcast, no gather."""
    b, h, w, c = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, oh, ow, c)

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return x[:, index(h, oh)][:, :, index(w, ow)]


class Upsample2D(nn.Module):
    """Nearest upsampling (x2, or to ``size``) then a 3x3 conv. [B, H, W, C] -> [B, H', W', C]."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
        return Conv(self.channels, dtype=self.dtype, name="conv")(x)


class Attention(nn.Module):
    """Multi-head attention with diffusers' ``Attention`` names: ``to_q``/``to_k``/``to_v`` (no bias) and
    ``to_out_0``. x [B, Lq, C], context [B, Lk, Cc] (None: self-attention) -> [B, Lq, C].

    ``capture``: when set and it selects this layer, the attention probabilities are computed explicitly and
    their mean over heads, [B, Lq, Lk] float32, is sown into the ``ATTENTION_MAPS`` collection as ``probs``
    (stored only when the caller makes that collection mutable). Otherwise the call is the plain
    ``dot_product_attention`` dispatch.
    """

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    capture: AttentionCapture | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        proj = lambda name: Dense(inner, use_bias=False, dtype=self.dtype, kernel_axes=("embed", "heads"),
                                  name=name)
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = constraints.heads(proj("to_q")(x).reshape(b, lq, self.heads, self.head_dim))
        k = constraints.heads(proj("to_k")(context).reshape(b, lk, self.heads, self.head_dim))
        v = constraints.heads(proj("to_v")(context).reshape(b, lk, self.heads, self.head_dim))
        if self.capture is not None and self.capture.selects(self.path):
            out, probs = attention_with_probs(q, k, v)
            self.sow(ATTENTION_MAPS, "probs", jnp.mean(probs, axis=1))
        else:
            out = dot_product_attention(q, k, v, impl=self.attention_impl)
        out = constraints.heads(out).reshape(b, lq, inner)
        return Dense(x.shape[-1], dtype=self.dtype, kernel_axes=("heads", "embed"), name="to_out_0")(out)


class GEGLU(nn.Module):
    """``h * gelu(g)`` with ``[h, g] = proj(x)`` split in halves (exact erf GELU, as ``F.gelu``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hg = Dense(2 * self.features, dtype=self.dtype, kernel_axes=("embed", "mlp"), name="proj")(x)
        h, g = jnp.split(hg, 2, axis=-1)
        return h * jax.nn.gelu(g, approximate=False)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net_2(net_0(x))``, inner width ``mult * C``. [B, L, C] -> same."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(self.mult * dim, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, kernel_axes=("mlp", "embed"), name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm (eps 1e-5) and residual.

    ``only_cross_attention``: ``attn1`` attends to the context too (as diffusers). ``capture`` reaches ``attn2``
    only (the cross-attention whose maps methods read). x [B, L, C], context [B, Lc, Cc] -> [B, L, C].
    """

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    capture: AttentionCapture | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = lambda name, capture=None: Attention(self.heads, self.head_dim, dtype=self.dtype,
                                                    attention_impl=self.attention_impl, capture=capture, name=name)
        norm = lambda name: LayerNorm(1e-5, dtype=self.dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2", self.capture)(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), ``proj_in``, ``num_layers`` transformer blocks, ``proj_out``, plus the input.

    ``proj_in``/``proj_out`` are Dense layers (``use_linear_projection``, SD 2) or 1x1 convs (SD 1); the two
    compute the same thing on NHWC and differ only in the stored kernel layout. x [B, H, W, C],
    context [B, Lc, Cc] -> [B, H, W, C].
    """

    heads: int
    head_dim: int
    groups: int
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    capture: AttentionCapture | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        inner = self.heads * self.head_dim

        def proj(features: int, name: str, axes) -> nn.Module:
            if self.use_linear_projection:
                return Dense(features, dtype=self.dtype, kernel_axes=axes, name=name)
            return Conv(features, kernel_size=(1, 1), padding="VALID", dtype=self.dtype, name=name)

        h = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        # proj_in's output is the transformer blocks' residual stream, so both of its axes are "embed" (the
        # second use of a mesh axis in one array replicates): the stream stays unsplit over `tensor`, as in
        # Megatron-style layouts. Naming the output "mlp" also tripped an XLA SPMD miscompile (jax 0.10.2,
        # XLA:CPU, Shardy and GSPMD alike): on a data x fsdp x tensor mesh, a Dense sharded (fsdp, tensor) with a
        # LoRA, feeding another Dense sharded (fsdp, tensor), got gradients 40-60 % wrong
        # (tests/test_train_sharding.py::test_xla_spmd_miscompile_is_still_present keeps the repro).
        h = proj(inner, "proj_in", ("embed", "embed"))(h).reshape(b, hh * ww, inner)
        for i in range(self.num_layers):
            # Tokens are the row-major flattening of the NHWC map, so a captured [B, hh*ww, Lc] map reshapes back
            # to [B, hh, ww, Lc].
            h = BasicTransformerBlock(self.heads, self.head_dim, self.only_cross_attention, dtype=self.dtype,
                                      attention_impl=self.attention_impl, capture=self.capture,
                                      name=f"transformer_blocks_{i}")(h, context)
        h = proj(c, "proj_out", ("embed", "embed"))(h.reshape(b, hh, ww, inner))
        return h + x.astype(h.dtype)


class _BlockBase(nn.Module):
    """Fields every down/mid/up block shares (see ``jsr.models.unet.UNetConfig`` for their meaning).
    Rematerialisation wraps whole blocks (``jsr.models.unet``, ``jsr.models.remat``)."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    act_fn: str = "silu"
    has_attention: bool = True
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    capture: AttentionCapture | None = None

    def resnet(self, name: str, scale: float = 1.0) -> nn.Module:
        return ResnetBlock2D(self.out_channels, self.groups, self.eps, self.act_fn, scale, dtype=self.dtype,
                             name=name)

    def transformer(self, name: str, channels: int) -> nn.Module:
        if channels % self.heads:
            raise ValueError(f"{self.name}: {channels} channels do not split into {self.heads} attention heads")
        return Transformer2DModel(
            self.heads, channels // self.heads, self.groups, self.transformer_layers, self.use_linear_projection,
            self.only_cross_attention, dtype=self.dtype, attention_impl=self.attention_impl, capture=self.capture,
            name=name)


class DownBlock2D(_BlockBase):
    """``num_layers`` x (resnet [+ transformer]) then an optional stride-2 downsampler (``CrossAttnDownBlock2D``
    when ``has_attention``, else ``DownBlock2D``). Returns the output and every intermediate state for the skips."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}", self.out_channels)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock2DCrossAttn(_BlockBase):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, then ``num_layers`` x (transformer, resnet); resnets
    divide their output by ``output_scale_factor``. [B, H, W, C] -> same (C = ``out_channels``)."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}", self.out_channels)(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock2D(_BlockBase):
    """``num_layers`` x (concat a skip, resnet [+ transformer]) then an optional nearest upsampler
    (``CrossAttnUpBlock2D`` when ``has_attention``, else ``UpBlock2D``). ``skips`` are consumed from the end;
    ``upsample_size`` is the spatial size to upsample to (the next skip's; x2 when None)."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"{self.name}: got {len(skips)} skip connections for {self.num_layers} layers")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}", self.out_channels)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x
