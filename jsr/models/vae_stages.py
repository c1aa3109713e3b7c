"""The SD VAE's encoder and decoder cut at every GroupNorm, for tiled execution with whole-image statistics.

A GroupNorm normalises with the mean and variance of the whole image. Run tile by tile, each tile would use its own
statistics, and a tiled VAE would differ from an untiled one everywhere, not only at tile borders. PyTorch's tiled
VAEs (Tiled-VAE, used by OSEDiff and PiSA-SR) avoid that by running the network layer by layer over all tiles and
pausing at each GroupNorm until every tile has contributed to its statistics. This module gives the network in the
form that needs: a list of :class:`Stage` s, each a pure function that starts with a GroupNorm whose statistics it
is handed (the first stage has none) and runs up to the next GroupNorm's input. The executor
(:mod:`jsr.sr.staged_tiling`) runs one stage on every tile, reduces the moments of its output over the image and
runs the next stage.

The carry between stages is a dict of NHWC arrays: ``x``, the stream (whose statistics the next stage's norm
needs), and ``skip``, a ResNet block's input held across its second norm. The stages compute exactly what
:class:`jsr.models.vae.AutoencoderKL` computes, from the same parameter tree (``tests/test_vae_stages.py`` pins
this); they do not take a LoRA tree: fold an encoder LoRA in first (``jsr.models.lora.merge``).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Callable, Mapping

import jax

from jsr.models.attention import dot_product_attention
from jsr.models.layers import Conv, Dense, group_moments, group_normalize
from jsr.models.unet_blocks import ACTIVATIONS, Downsample2D
from jsr.models.vae import NORM_EPS, AutoencoderKL, Upsample

Carry = dict[str, jax.Array]
Params = Mapping[str, Any]
# (params of the whole AutoencoderKL, carry, group mean [N, G], group variance [N, G], context) -> carry
StageFn = Callable[[Params, Carry, jax.Array | None, jax.Array | None, Carry | None], Carry]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One piece of the network between two GroupNorms.

    Attributes:
      name: the GroupNorm the stage starts with (its parameter path, ``/``-joined), or what it runs when it has
        none (the first stage).
      fn: the stage (:data:`StageFn`); ``mean``/``var`` are ``None`` for a stage without a norm, ``context``
        is ``None`` unless the previous stage gathers.
      groups: the opening GroupNorm's group count (0 without one).
      scale: spatial size of the stage's output over the network input's (1/2, 1/4... in the encoder, 2, 4...
        in the decoder).
      gather: keys of the stage's output carry that the next stage needs for the *whole image*: the executor
        assembles them ([N, h, w, C] at this stage's scale) and hands them to the next stage as ``context``
        instead of in the carry. The attention's keys and values are gathered, so that attention over a tile's
        queries sees every position of the image, as untiled.
      pointwise: the stage's output at a pixel depends only on the carry at that pixel (and the context), as
        the attention's second stage: the executor may run it once per image pixel (on the mosaic of the
        windows' cores) instead of once per window pixel, the overlaps included.
    """

    name: str
    fn: StageFn
    groups: int
    scale: Fraction
    gather: tuple[str, ...] = ()
    pointwise: bool = False


def _sub(params: Params, path: str) -> Params:
    for key in path.split("/"):
        params = params[key]
    return params


def _conv(params: Params, x: jax.Array, dtype: Any) -> jax.Array:
    """A stride-1 ``jsr.models.layers.Conv`` (3x3 padded by one, or 1x1) with the kernel's own shape."""
    kh, kw, _, out = params["kernel"].shape
    pad = ((0, 0), (0, 0)) if (kh, kw) == (1, 1) else ((1, 1), (1, 1))
    return Conv(out, kernel_size=(kh, kw), padding=pad, dtype=dtype).apply({"params": params}, x)


def _norm(params: Params, x: jax.Array, mean: jax.Array, var: jax.Array, dtype: Any) -> jax.Array:
    return group_normalize(x, mean, var, params["scale"], params["bias"], NORM_EPS, dtype)


class _Builder:
    """Appends the stages of one encoder/decoder, tracking the spatial scale."""

    def __init__(self, vae: AutoencoderKL):
        self.cfg, self.dtype, self.attention_impl = vae.config, vae.dtype, vae.attention_impl
        self.act = ACTIVATIONS[vae.config.act_fn]
        self.groups = vae.config.norm_num_groups
        self.scale = Fraction(1)
        self.stages: list[Stage] = []

    def add(self, name: str, fn: Callable[..., Carry], groups: int | None = None, gather: tuple[str, ...] = (),
            context: bool = False, pointwise: bool = False) -> None:
        """Append ``fn(params, carry, mean, var)`` (``fn(params, carry, mean, var, context)`` if ``context``)."""
        full = fn if context else (lambda params, carry, mean, var, ctx: fn(params, carry, mean, var))
        self.stages.append(Stage(name, full, self.groups if groups is None else groups, self.scale, gather,
                                 pointwise))

    def resnet(self, path: str, resample: Callable[[Params, jax.Array], jax.Array] | None = None,
               resample_scale: Fraction = Fraction(1)) -> None:
        """``ResnetBlock`` as two stages (at ``norm1`` and ``norm2``); ``resample`` (a down- or upsampler of the
        enclosing block) runs at the end of the second."""
        dt, act = self.dtype, self.act

        def first(params, carry, mean, var):
            p = _sub(params, path)
            x = carry["x"]
            h = _conv(p["conv1"], act(_norm(p["norm1"], x, mean, var, dt)), dt)
            return {"x": h, "skip": x}

        def second(params, carry, mean, var):
            p = _sub(params, path)
            h = _conv(p["conv2"], act(_norm(p["norm2"], carry["x"], mean, var, dt)), dt)
            skip = carry["skip"]
            if "conv_shortcut" in p:
                skip = _conv(p["conv_shortcut"], skip, dt)
            out = skip.astype(h.dtype) + h
            return {"x": out if resample is None else resample(params, out)}

        self.add(f"{path}/norm1", first)
        self.scale *= resample_scale
        self.add(f"{path}/norm2", second)

    def attention(self, path: str) -> None:
        """The mid-block's ``SpatialSelfAttention`` as two stages: the norm and the projections, whose keys and
        values are gathered over the image; then every query attends to all of them and the residual is added.
        The second stage's queries of all windows in a batch are concatenated along the sequence (queries are
        independent), so the image's keys and values are held once, not once per window."""
        dt, impl = self.dtype, self.attention_impl

        def project(params, carry, mean, var):
            p = _sub(params, path)
            x = carry["x"]
            h = _norm(p["group_norm"], x, mean, var, dt)
            q, k, v = (Dense(x.shape[-1], dtype=dt).apply({"params": p[n]}, h) for n in ("to_q", "to_k", "to_v"))
            return {"x": x, "q": q, "k": k, "v": v}

        def attend(params, carry, mean, var, context):
            p = _sub(params, path)
            x, q = carry["x"], carry["q"]
            n, hh, ww, c = x.shape
            if context is None:  # untiled: the image is the tile
                context = {"k": carry["k"], "v": carry["v"]}
            b = context["k"].shape[0]
            kv = [context[name].reshape(b, -1, 1, c) for name in ("k", "v")]
            # Windows are stacked image-major within each window ([w0 i0, w0 i1, w1 i0...]): regroup per image.
            qs = q.reshape(n // b, b, hh * ww, c).transpose(1, 0, 2, 3).reshape(b, -1, 1, c)
            out = dot_product_attention(qs, *kv, impl=impl)
            out = out.reshape(b, n // b, hh * ww, c).transpose(1, 0, 2, 3).reshape(n, hh * ww, c)
            out = Dense(c, dtype=dt).apply({"params": p["to_out_0"]}, out)
            return {"x": out.reshape(n, hh, ww, c) + x.astype(out.dtype)}

        self.add(f"{path}/group_norm", project, gather=("k", "v"))
        # Per pixel: each query attends to the whole image's keys; the residual and out-projection are per pixel.
        self.add(f"{path}/attention", attend, groups=0, context=True, pointwise=True)

    def mid_block(self, path: str) -> None:
        self.resnet(f"{path}/resnets_0")
        if self.cfg.mid_block_add_attention:
            self.attention(f"{path}/attentions_0")
        self.resnet(f"{path}/resnets_1")


def encoder_stages(vae: AutoencoderKL) -> list[Stage]:
    """``vae.encode`` as stages: images [N, H, W, 3] in [-1, 1] (H, W multiples of ``config.downscale``) ->
    ``{"x": moments}`` [N, H/f, W/f, 2 * latent_channels] after ``quant_conv`` (mean, then log-variance before
    clipping), in ``vae.dtype``."""
    cfg, dt = vae.config, vae.dtype
    bld = _Builder(vae)
    bld.add("encoder/conv_in", lambda params, carry, mean, var: {
        "x": _conv(params["encoder"]["conv_in"], carry["x"].astype(dt), dt)}, groups=0)
    channels = cfg.block_out_channels
    for i, c in enumerate(channels):
        for j in range(cfg.layers_per_block):
            path = f"encoder/down_blocks_{i}/resnets_{j}"
            if j == cfg.layers_per_block - 1 and i < len(channels) - 1:
                def down(params, x, i=i, c=c):
                    p = params["encoder"][f"down_blocks_{i}"]["downsamplers_0"]
                    return Downsample2D(c, padding=0, dtype=dt).apply({"params": p}, x)
                bld.resnet(path, down, Fraction(1, 2))
            else:
                bld.resnet(path)
    bld.mid_block("encoder/mid_block")

    def out(params, carry, mean, var):
        enc = params["encoder"]
        h = _conv(enc["conv_out"], jax.nn.silu(_norm(enc["conv_norm_out"], carry["x"], mean, var, dt)), dt)
        return {"x": _conv(params["quant_conv"], h, dt) if cfg.use_quant_conv else h}

    bld.add("encoder/conv_norm_out", out)
    return bld.stages


def decoder_stages(vae: AutoencoderKL) -> list[Stage]:
    """``vae.decode`` as stages: *unscaled* latents [N, h, w, latent_channels] -> ``{"x": images}``
    [N, f h, f w, out_channels] (about [-1, 1], not clipped), in ``vae.dtype``."""
    cfg, dt = vae.config, vae.dtype
    bld = _Builder(vae)

    def first(params, carry, mean, var):
        z = carry["x"].astype(dt)
        if cfg.use_post_quant_conv:
            z = _conv(params["post_quant_conv"], z, dt)
        return {"x": _conv(params["decoder"]["conv_in"], z, dt)}

    bld.add("decoder/conv_in", first, groups=0)
    bld.mid_block("decoder/mid_block")
    channels = tuple(reversed(cfg.block_out_channels))
    n = cfg.layers_per_block + 1
    for i, c in enumerate(channels):
        for j in range(n):
            path = f"decoder/up_blocks_{i}/resnets_{j}"
            if j == n - 1 and i < len(channels) - 1:
                def up(params, x, i=i, c=c):
                    p = params["decoder"][f"up_blocks_{i}"]["upsamplers_0"]
                    return Upsample(c, dtype=dt).apply({"params": p}, x)
                bld.resnet(path, up, Fraction(2))
            else:
                bld.resnet(path)

    def out(params, carry, mean, var):
        dec = params["decoder"]
        h = jax.nn.silu(_norm(dec["conv_norm_out"], carry["x"], mean, var, dt))
        return {"x": _conv(dec["conv_out"], h, dt)}

    bld.add("decoder/conv_norm_out", out)
    return bld.stages


def run_untiled(stages: list[Stage], params: Params, x: jax.Array) -> jax.Array:
    """All ``stages`` on whole images, each norm with its input's own statistics: what the module computes (the
    reference the tests hold staged tiling to). Returns the last carry's ``x``."""
    carry: Carry = {"x": x}
    context = None
    for st in stages:
        mean, var = group_moments(carry["x"], st.groups) if st.groups else (None, None)
        carry = st.fn(params, carry, mean, var, context)
        context = {k: carry.pop(k) for k in st.gather} or None
    return carry["x"]
