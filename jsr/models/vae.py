"""The Stable Diffusion ``AutoencoderKL`` (diffusers) in Flax linen, NHWC, built from a diffusers config.

    cfg = VAEConfig.from_diffusers(json.load(open("vae/config.json")))
    vae = AutoencoderKL(cfg)
    mean, logvar = vae.apply({"params": params}, x, method="encode")     # x [B, H, W, 3] in [-1, 1]
    x_rec = vae.apply({"params": params}, mean, method="decode")         # [B, H, W, 3], about [-1, 1]

Latents are *unscaled*: multiplying by ``config.scaling_factor`` (0.18215 for SD 2.1) is the caller's job, as in
diffusers. Submodules carry diffusers' attribute names (``encoder/down_blocks_0/resnets_1/conv1``,
``encoder/mid_block/attentions_0/to_out_0``...), so ``jsr.weights.vae`` converts checkpoints with the generic
converter, and every Dense/Conv is a ``jsr.models.layers`` one: a LoRA tree in the ``lora`` collection reaches
the encoder's convolutions, attention projections and ``quant_conv`` (OSEDiff's VAE LoRA).

Spatial sizes: the encoder halves H and W ``len(block_out_channels) - 1`` times with diffusers' bottom/right
padding, so any size works (even sizes match PyTorch exactly); SD's VAE maps H x W to H/8 x W/8.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models import constraints
from jsr.models import remat as remat_lib
from jsr.models.attention import dot_product_attention
from jsr.models.layers import LORA_COLLECTION, Conv, Dense, GroupNorm
from jsr.models.unet_blocks import ACTIVATIONS, Downsample2D

Dtype = Any

# Every norm in diffusers' Encoder/Decoder (resnets, mid-block attention, conv_norm_out) uses this epsilon.
NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
# Options jsr implements.
_USED = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
         "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor",
         "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
# Options that describe data or PyTorch-side behaviour, not the network: accepted with any value.
_IGNORED = ("sample_size", "force_upcast")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The resolved ``AutoencoderKL`` architecture (hashable, as Flax module attributes must be).

    ``scaling_factor``/``shift_factor``/``latents_mean``/``latents_std`` are not used by the network (latents
    are unscaled); they are kept for callers. ``diffusers_json`` is the original ``config.json`` (sorted JSON),
    written back unchanged by ``jsr.weights.vae.save_vae``.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    diffusers_json: str = "{}"

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers ``AutoencoderKL`` ``config.json`` dict (missing keys take diffusers' defaults).

        Raises:
          ValueError naming the option when the config is not an SD-family ``AutoencoderKL`` (unknown options,
          other block types, per-block layer counts, channels that do not split into the norm groups...).
        """
        cfg = dict(cfg)
        name = cfg.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name={name!r}; jsr builds diffusers' AutoencoderKL only")
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _USED and k not in _IGNORED)
        if unknown:
            raise ValueError(f"VAE config: unknown option(s) {unknown}; jsr builds diffusers' AutoencoderKL "
                             "(Stable Diffusion family)")
        channels = tuple(cfg.get("block_out_channels", (64,)))
        n = len(channels)
        down = tuple(cfg.get("down_block_types", (_DOWN,)))
        up = tuple(cfg.get("up_block_types", (_UP,)))
        for key, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
            if len(types) != n:
                raise ValueError(f"VAE config: {key} has {len(types)} entries but block_out_channels has {n}")
            for i, t in enumerate(types):
                if t != known:
                    raise ValueError(f"VAE config: {key}[{i}] = {t!r} is not supported by jsr (only {known!r})")
        layers = cfg.get("layers_per_block", 1)
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"VAE config: layers_per_block={layers!r} must be one positive int")
        groups = cfg.get("norm_num_groups", 32)
        bad = [c for c in channels if not isinstance(groups, int) or groups < 1 or c % groups]
        if bad:
            raise ValueError(f"VAE config: block_out_channels {list(channels)} do not split into "
                             f"norm_num_groups={groups!r} groups")
        act = cfg.get("act_fn", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"VAE config: act_fn={act!r} is not supported (known: {sorted(ACTIVATIONS)})")
        opt_tuple = lambda v: None if v is None else tuple(float(x) for x in v)
        shift = cfg.get("shift_factor")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            block_out_channels=channels,
            layers_per_block=layers,
            norm_num_groups=groups,
            act_fn=act,
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            latents_mean=opt_tuple(cfg.get("latents_mean")),
            latents_std=opt_tuple(cfg.get("latents_std")),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
            diffusers_json=json.dumps(cfg, sort_keys=True),
        )

    def to_diffusers(self) -> dict:
        """The original diffusers config dict this config was built from."""
        return json.loads(self.diffusers_json)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding, as the VAE uses it:
    ``x' + conv2(act(norm2(conv1(act(norm1(x))))))``, ``x'`` through a 1x1 ``conv_shortcut`` when the channel
    count changes. [B, H, W, Cin] -> [B, H, W, out_channels]."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        h = act(GroupNorm(self.groups, NORM_EPS, dtype=self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        h = act(GroupNorm(self.groups, NORM_EPS, dtype=self.dtype, name="norm2")(h))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                     name="conv_shortcut")(x)
        return x.astype(h.dtype) + h


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention (diffusers ``Attention`` built from the old ``AttentionBlock``): GroupNorm,
    single-head self-attention over the H*W positions with biased ``to_q``/``to_k``/``to_v``/``to_out_0``, then
    the residual. [B, H, W, C] -> same. At 512 px the latent grid is 64 x 64, so 4096 tokens of width 512: the
    ``auto`` attention path keeps the score matrix blocked on CPU."""

    groups: int
    heads: int = 1
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        if c % self.heads:
            raise ValueError(f"{self.name}: {c} channels do not split into {self.heads} heads")
        d = c // self.heads
        h = GroupNorm(self.groups, NORM_EPS, dtype=self.dtype, name="group_norm")(x).reshape(b, hh * ww, c)
        proj = lambda name: Dense(c, dtype=self.dtype, kernel_axes=("embed", "heads"), name=name)
        q = proj("to_q")(h).reshape(b, hh * ww, self.heads, d)
        k = proj("to_k")(h).reshape(b, hh * ww, self.heads, d)
        v = proj("to_v")(h).reshape(b, hh * ww, self.heads, d)
        out = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, hh * ww, c)
        out = Dense(c, dtype=self.dtype, kernel_axes=("heads", "embed"), name="to_out_0")(out)
        # diffusers divides by rescale_output_factor here; the VAE builds it as 1.
        return out.reshape(b, hh, ww, c) + x.astype(out.dtype)


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, attention (optional), resnet.
    [B, H, W, C] -> same."""

    channels: int
    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.groups, self.act_fn, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, dtype=self.dtype, attention_impl=self.attention_impl,
                                     name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.act_fn, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: ``num_layers`` resnets, then (unless last) a 3x3 stride-2 conv after
    padding bottom/right by one. [B, H, W, Cin] -> [B, H // 2, W // 2, out_channels] (H, W when last)."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    add_downsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.act_fn, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            # padding=0 is diffusers' (0, 1, 0, 1) pad then an unpadded stride-2 conv.
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """The 3x3 kernel [3, 3, I, O] of "nearest x2, then conv (padding 1)" as a 2x2 kernel [2, 2, I, 4 * O] on the
    low-resolution input, output channels ordered (row parity, column parity, O).

    Along one axis, output ``2i + p`` sees input rows ``i - 1, i, i`` (p = 0) or ``i, i, i + 1`` (p = 1) through
    the taps ``k[0], k[1], k[2]``: the repeated row's taps add up, leaving 2 distinct rows per parity. On the
    input padded by one, a 2x2 window at position ``q`` covers rows ``q - 1, q``: parity 0 is read at ``q = i``,
    parity 1 at ``q = i + 1``.
    """
    def split(k: jax.Array, axis: int) -> jax.Array:
        t0, t1, t2 = (jnp.take(k, j, axis=axis) for j in range(3))
        return jnp.stack([jnp.stack([t0, t1 + t2], axis), jnp.stack([t0 + t1, t2], axis)])  # parity first

    rows = split(kernel, 0)                 # [pr, 2, 3, I, O]
    both = split(rows, 2)                   # [pc, pr, 2, 2, I, O]
    i, o = kernel.shape[2], kernel.shape[3]
    return jnp.transpose(both, (2, 3, 4, 1, 0, 5)).reshape(2, 2, i, 4 * o)


class UpsampleConv(nn.Module):
    """Nearest x2 upsampling then a 3x3 conv (padding 1), computed exactly as one 2x2 conv on the
    low-resolution input followed by a pixel shuffle: 4/9 of the multiply-adds of convolving the upsampled
    image. In the SD decoder these convs run at up to 512 x 512 x 256 and are ~30 % of its FLOPs.

    Parameters are those of the plain conv (``kernel`` [3, 3, I, O] HWIO, ``bias``), so checkpoints and LoRA
    trees are unchanged; a LoRA in the ``lora`` collection (``a`` [3, 3, I, r], ``b`` [1, 1, r, O]) is folded
    into the kernel first, which equals the plain conv's LoRA branch. [B, H, W, I] -> [B, 2H, 2W, features].
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        o = self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes),
                            (3, 3, c, o), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[-1],)),
                          (o,), self.param_dtype)
        dtype = self.dtype or x.dtype
        # Taps are summed in float32 so a bf16 compute dtype rounds the combined weights once.
        k = kernel.astype(jnp.float32)
        if self.has_variable(LORA_COLLECTION, "a"):
            la = self.get_variable(LORA_COLLECTION, "a").astype(jnp.float32)
            lb = self.get_variable(LORA_COLLECTION, "b").astype(jnp.float32)
            k = k + jnp.einsum("hwir,ro->hwio", la, lb.reshape(lb.shape[-2], lb.shape[-1]))
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), _subpixel_kernel(k).astype(dtype), window_strides=(1, 1), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))             # [B, H+1, W+1, (pr, pc, O)]
        y = y.reshape(b, h + 1, w + 1, 2, 2, o)
        rows = [jnp.stack([y[:, pr:pr + h, pc:pc + w, pr, pc] for pc in range(2)], axis=3) for pr in range(2)]
        out = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)  # [B, H, pr, W, pc, O] -> interleaved
        return out + bias.astype(dtype)


class Upsample(nn.Module):
    """diffusers' ``Upsample2D`` as the VAE decoder uses it (nearest x2, 3x3 conv named ``conv``).
    [B, H, W, C] -> [B, 2H, 2W, channels]."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return UpsampleConv(self.channels, dtype=self.dtype, name="conv")(x)


class UpDecoderBlock(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: ``num_layers`` resnets, then (unless last) nearest x2 and a 3x3 conv.
    [B, H, W, Cin] -> [B, 2H, 2W, out_channels] (H, W when last)."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.act_fn, dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean and log-variance, before
    ``quant_conv``); f = ``config.downscale``. ``remat_blocks``: each down block and the mid block is one
    checkpoint (``jsr.models.remat``)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat_blocks: bool = False
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        ch = cfg.block_out_channels
        down, mid = (remat_lib.checkpointed(cls, self.remat_blocks, self.remat_policy)
                     for cls in (DownEncoderBlock, MidBlock))
        x = constraints.image(Conv(ch[0], dtype=dt, name="conv_in")(x.astype(dt)))
        for i, c in enumerate(ch):
            x = constraints.image(down(c, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn,
                                       add_downsample=i < len(ch) - 1, dtype=dt, name=f"down_blocks_{i}")(x))
        x = constraints.image(mid(ch[-1], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dtype=dt,
                                  attention_impl=self.attention_impl, name="mid_block")(x))
        x = GroupNorm(cfg.norm_num_groups, NORM_EPS, dtype=dt, name="conv_norm_out")(x)
        # diffusers' conv_act is SiLU whatever act_fn says.
        x = jax.nn.silu(x)
        return Conv(2 * cfg.latent_channels, dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] (after ``post_quant_conv``) -> image [B, h*f, w*f, out_channels].
    ``remat_blocks``: the mid block and each up block is one checkpoint (``jsr.models.remat``)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat_blocks: bool = False
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        ch = tuple(reversed(cfg.block_out_channels))
        mid, up = (remat_lib.checkpointed(cls, self.remat_blocks, self.remat_policy)
                   for cls in (MidBlock, UpDecoderBlock))
        x = constraints.image(Conv(ch[0], dtype=dt, name="conv_in")(z.astype(dt)))
        x = constraints.image(mid(ch[0], cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dtype=dt,
                                  attention_impl=self.attention_impl, name="mid_block")(x))
        for i, c in enumerate(ch):
            x = constraints.image(up(c, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn,
                                     add_upsample=i < len(ch) - 1, dtype=dt, name=f"up_blocks_{i}")(x))
        x = GroupNorm(cfg.norm_num_groups, NORM_EPS, dtype=dt, name="conv_norm_out")(x)
        x = jax.nn.silu(x)
        return Conv(cfg.out_channels, dtype=dt, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (SD 1.x/2.x VAE), NHWC.

    Attributes:
      config: the architecture (:class:`VAEConfig`).
      dtype: compute dtype (bf16 on accelerators; parameters may stay float32). Norm statistics and the
        attention softmax are float32 always.
      attention_impl: ``jsr.models.attention`` implementation of the mid-block attention (``auto``).
      remat: gradient checkpointing in training (``jsr.models.remat``): ``"none"``, ``"blocks"`` (each encoder
        and decoder block one checkpoint; ``True`` means this), ``"full"`` (the whole encoder and the whole
        decoder one checkpoint each). Parameter names and forward values are the same in every mode.
      remat_policy: a ``jax.checkpoint_policies`` name (``None``: save nothing, recompute all).

    Methods (``module.apply({"params": p}, x, method="encode")`` or ``method=module.encode``):
      ``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; ``__call__(x)`` is ``decode(encode(x)[0])``.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool | str = False
    remat_policy: str | None = None

    def setup(self) -> None:
        cfg = self.config
        mode = remat_lib.remat_mode(self.remat)
        kw = dict(dtype=self.dtype, attention_impl=self.attention_impl, remat_blocks=mode == "blocks",
                  remat_policy=self.remat_policy)
        whole = mode == "full"
        self.encoder = remat_lib.checkpointed(Encoder, whole, self.remat_policy)(cfg, **kw)
        self.decoder = remat_lib.checkpointed(Decoder, whole, self.remat_policy)(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior of images ``x``.

        Args:
          x: [B, H, W, in_channels] images in [-1, 1] (NHWC); H, W multiples of ``config.downscale`` (8 for SD).
        Returns:
          ``(mean, logvar)``, each [B, H/f, W/f, latent_channels] (f = ``config.downscale``) in ``dtype``,
          *unscaled* (multiply by ``config.scaling_factor`` for the diffusion latent space); ``logvar`` clipped to
          [-30, 20] as diffusers' ``DiagonalGaussianDistribution``.
        """
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"VAE encode expects NHWC images with {self.config.in_channels} channels, got "
                             f"shape {x.shape}")
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images from *unscaled* latents (divide diffusion latents by ``config.scaling_factor`` first).

        Args:
          z: [B, h, w, latent_channels] (NHWC).
        Returns:
          [B, f*h, f*w, out_channels] (f = ``config.downscale``, 8 for SD) in ``dtype``, about [-1, 1] (not
          clipped).
        """
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"VAE decode expects NHWC latents with {self.config.latent_channels} channels, got "
                             f"shape {z.shape}")
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``decode(mean of encode(x))``: [B, H, W, in_channels] in [-1, 1] -> [B, H, W, out_channels]. Touches
        every parameter, so ``init`` uses it."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """An image [B, f, f, in_channels] (f = ``config.downscale``): the smallest that runs every layer, for
        shape inference (``jsr.models.common``)."""
        f = self.config.downscale
        return (jnp.zeros((batch, f, f, self.config.in_channels), jnp.float32),)
