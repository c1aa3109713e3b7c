"""The Stable Diffusion 1.x/2.x ``UNet2DConditionModel`` in Flax linen, NHWC, built from a diffusers config.

    cfg = UNetConfig.from_diffusers(json.load(open("unet/config.json")))
    unet = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    eps = unet.apply({"params": params}, z_t, t, text_embeddings)    # [B, h, w, 4], t float [B] or scalar

Parameters are named after diffusers' attributes (see ``jsr.models.unet_blocks``), so
``jsr.weights.unet.load_unet``/``save_unet`` convert checkpoints both ways with the generic converter.

Extension points for one-step SR methods, none of which adds a parameter (the tree stays the checkpoint's):

* ``conv_in_modulation=(scale, shift)``: ``h * (1 + scale) + shift`` on ``conv_in``'s output (CODSR's SFT).
* ``encoder_hidden_states`` of any token count: a method may pass its own context (visual prompt tokens...).
* ``capture_attention=("up_blocks.1.attentions", ...)`` (static): the named ``attn2`` layers sow their
  head-averaged probabilities into the ``"attention_maps"`` collection; read them with :func:`attention_maps`::

    eps, state = unet.apply({"params": params}, z_t, t, ctx, capture_attention=("",), mutable=["attention_maps"])
    maps = attention_maps(state)    # {"up_blocks.1.attentions.0.transformer_blocks.0.attn2": [B, Lq, Lk], ...}

diffusers naming quirk, reproduced on purpose: in SD configs ``attention_head_dim`` is the *number of heads*
per block (``num_attention_heads`` must be unset; diffusers itself rejects it), and the head width is
``channels // heads``. SD-2.1's ``[5, 10, 20, 20]`` therefore means 64-wide heads at every level; SD-1.5's ``8``
means 8 heads of width 40/80/160. Up blocks use the reversed list.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models import constraints
from jsr.models import remat as remat_lib
from jsr.models.layers import Conv, GroupNorm
from jsr.models.lora import module_name
from jsr.models.unet_blocks import (ACTIVATIONS, ATTENTION_MAPS, ATTENTION_PATH_LISTS, AttentionCapture,
                                    DownBlock2D, MidBlock2DCrossAttn, TimestepEmbedding, UpBlock2D,
                                    timestep_embedding)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers UNet2DConditionModel options outside the SD 1.x/2.x family: jsr accepts only these values.
_FIXED = {
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# Options diffusers passes only to block types jsr does not build (SimpleCrossAttn*, ResnetDownsample*...), or
# that describe data rather than the network: accepted with any value, they change nothing here.
_IGNORED = ("sample_size", "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
            "addition_embed_type_num_heads", "mid_block_only_cross_attention")
# Options jsr implements (besides the block-type lists).
_USED = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
         "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
         "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
         "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
         "use_linear_projection", "upcast_attention", "time_embedding_dim", "conv_in_kernel", "conv_out_kernel")


def _per_block(cfg: Mapping, key: str, default: Any, n: int, kind: type) -> tuple:
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {key} has {len(value)} entries but there are {n} down blocks")
        if not all(isinstance(v, kind) and not isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"UNet config: {key}={value!r} must be one {kind.__name__} or one per block "
                             "(per-layer nesting is not supported by jsr)")
        return tuple(value)
    if not isinstance(value, kind):
        raise ValueError(f"UNet config: {key}={value!r} must be a {kind.__name__} or a list of them")
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The resolved UNet architecture (per-down-block tuples; up blocks use them reversed).

    ``heads`` is the number of attention heads per down block (diffusers' ``attention_head_dim``, see the
    module docstring). ``diffusers_json`` keeps the original ``config.json`` (sorted JSON) so ``save_unet`` can
    write it back unchanged; the dataclass is hashable, as Flax module attributes must be.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]
    cross_attention_dim: int
    only_cross_attention: tuple[bool, ...]
    use_linear_projection: bool
    upcast_attention: bool
    norm_num_groups: int
    norm_eps: float
    act_fn: str
    flip_sin_to_cos: bool
    freq_shift: float
    time_embed_dim: int
    downsample_padding: int
    mid_block_scale_factor: float
    center_input_sample: bool
    conv_in_kernel: int
    conv_out_kernel: int
    diffusers_json: str = "{}"

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
        """Build from a diffusers ``UNet2DConditionModel`` ``config.json`` dict (defaults as diffusers').

        Raises:
          ValueError naming the option when the config uses something outside the SD 1.x/2.x family
          (unknown block types, class/addition embeddings, dual cross-attention...) or is inconsistent.
        """
        cfg = dict(cfg)
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _FIXED and k not in _IGNORED
                         and k not in _USED)
        if unknown:
            raise ValueError(f"UNet config: unknown option(s) {unknown}; jsr builds diffusers' "
                             "UNet2DConditionModel for the SD 1.x/2.x family")
        for key, allowed in _FIXED.items():
            if key in cfg and cfg[key] != allowed:
                raise ValueError(f"UNet config: {key}={cfg[key]!r} is not supported by jsr (SD 1.x/2.x UNets use "
                                 f"{allowed!r})")
        down = tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = tuple(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        for key, types, known in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up,
                                                                                 UP_BLOCK_TYPES)):
            for i, t in enumerate(types):
                if t not in known:
                    raise ValueError(f"UNet config: {key}[{i}] = {t!r} is not a block type jsr supports "
                                     f"(supported: {', '.join(known)})")
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in MID_BLOCK_TYPES:
            raise ValueError(f"UNet config: mid_block_type = {mid!r} is not a block type jsr supports "
                             f"(supported: UNetMidBlock2DCrossAttn or null)")
        n = len(down)
        channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        if len(channels) != n or len(up) != n:
            raise ValueError(f"UNet config: block_out_channels ({len(channels)}), down_block_types ({n}) and "
                             f"up_block_types ({len(up)}) must have the same length")
        cross = _per_block(cfg, "cross_attention_dim", 1280, n, int)
        if len(set(cross)) != 1:
            raise ValueError(f"UNet config: cross_attention_dim={list(cross)} differs between blocks; jsr takes one "
                             "encoder_hidden_states width")
        groups = cfg.get("norm_num_groups", 32)
        if groups is None:
            raise ValueError("UNet config: norm_num_groups=None is not supported by jsr (SD UNets use 32)")
        act = cfg.get("act_fn", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"UNet config: act_fn={act!r} is not supported (known: {sorted(ACTIVATIONS)})")
        heads = _per_block(cfg, "attention_head_dim", 8, n, int)
        conv_in_kernel, conv_out_kernel = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
        if conv_in_kernel % 2 == 0 or conv_out_kernel % 2 == 0:
            raise ValueError("UNet config: conv_in_kernel and conv_out_kernel must be odd")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=_per_block(cfg, "layers_per_block", 2, n, int),
            transformer_layers_per_block=_per_block(cfg, "transformer_layers_per_block", 1, n, int),
            heads=heads,
            cross_attention_dim=cross[0],
            only_cross_attention=_per_block(cfg, "only_cross_attention", False, n, bool),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            norm_num_groups=groups,
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            act_fn=act,
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=float(cfg.get("freq_shift", 0)),
            time_embed_dim=cfg.get("time_embedding_dim") or 4 * channels[0],
            downsample_padding=cfg.get("downsample_padding", 1),
            mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
            center_input_sample=bool(cfg.get("center_input_sample", False)),
            conv_in_kernel=conv_in_kernel,
            conv_out_kernel=conv_out_kernel,
            diffusers_json=json.dumps(cfg, sort_keys=True),
        )

    def to_diffusers(self) -> dict:
        """The original diffusers config dict this config was built from."""
        return json.loads(self.diffusers_json)


def cross_attention_layers(config: UNetConfig) -> tuple[str, ...]:
    """PyTorch names of every cross-attention (``attn2``) layer of a UNet with ``config``, in execution order
    (down blocks, mid block, up blocks), e.g. ``down_blocks.0.attentions.1.transformer_blocks.0.attn2``; the names
    ``capture_attention`` patterns are matched against and :func:`attention_maps` returns."""
    names = []

    def add(block: str, attentions: int, transformer_layers: int) -> None:
        names.extend(f"{block}.attentions.{j}.transformer_blocks.{k}.attn2"
                     for j in range(attentions) for k in range(transformer_layers))

    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            add(f"down_blocks.{i}", config.layers_per_block[i], config.transformer_layers_per_block[i])
    if config.mid_block_type is not None:
        add("mid_block", 1, config.transformer_layers_per_block[-1])
    layers, t_layers = config.layers_per_block[::-1], config.transformer_layers_per_block[::-1]
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            add(f"up_blocks.{i}", layers[i] + 1, t_layers[i])
    return tuple(names)


def _capture_patterns(capture_attention: str | Sequence[str], config: UNetConfig) -> tuple[str, ...]:
    # A bare string is one pattern (not its characters). Every pattern must select something: a typo would
    # otherwise just return no maps.
    patterns = (capture_attention,) if isinstance(capture_attention, str) else tuple(capture_attention)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"capture_attention must be a tuple of module-name substrings, got {capture_attention!r}")
    layers = cross_attention_layers(config)
    for p in patterns:
        if not any(p in name for name in layers):
            raise ValueError(f"capture_attention pattern {p!r} selects no cross-attention layer of this UNet; its "
                             f"attn2 layers are named like {layers[:2]}... (jsr.models.unet.cross_attention_layers)")
    return patterns


def _modulate(x: jax.Array, modulation: tuple[jax.Array, jax.Array]) -> jax.Array:
    if not isinstance(modulation, (tuple, list)) or len(modulation) != 2:
        raise TypeError("conv_in_modulation must be None or a (scale, shift) pair of arrays")
    scale, shift = (jnp.asarray(m) for m in modulation)
    for what, m in (("scale", scale), ("shift", shift)):
        try:
            ok = jnp.broadcast_shapes(m.shape, x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"conv_in_modulation {what} of shape {m.shape} does not broadcast to conv_in's output "
                             f"{x.shape} (NHWC)")
    # float32 arithmetic, one rounding to the compute dtype: in bf16, 1 + scale would lose a small scale.
    f32 = jnp.float32
    return (x.astype(f32) * (1 + scale.astype(f32)) + shift.astype(f32)).astype(x.dtype)


def attention_maps(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
    """PyTorch module name -> captured cross-attention map, from ``apply(..., mutable=["attention_maps"])``.

    Args:
      collection: the mutated-variables dict ``apply`` returned (``{"attention_maps": {...}}``) or the
        ``"attention_maps"`` collection itself. Names are relative to the root of the tree given: pass the
        UNet's subtree when the UNet is a submodule of a larger model.
    Returns:
      ``{"up_blocks.1.attentions.0.transformer_blocks.0.attn2": probs, ...}`` where ``probs`` is [B, Lq, Lk]
      float32, the softmax probabilities averaged over heads (each row sums to 1); Lq = h * w of that layer's
      feature map flattened row-major (reshape to [B, h, w, Lk] for a spatial map), Lk the context length. A
      layer that ran N > 1 times in one ``apply`` gives [N, B, Lq, Lk] (calls in order).
    """
    tree = collection.get(ATTENTION_MAPS, collection) if isinstance(collection, Mapping) else collection
    out: dict[str, jax.Array] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            elif key == "probs":
                values = tuple(value)  # sow stores one entry per call
                out[module_name(path, ATTENTION_PATH_LISTS)] = values[0] if len(values) == 1 else jnp.stack(values)

    walk(tree, ())
    return out


class UNet2DConditionModel(nn.Module):
    """SD 1.x/2.x conditional UNet (epsilon or v prediction, as its weights were trained), NHWC.

    Attributes:
      config: the architecture (:class:`UNetConfig`).
      dtype: compute dtype (bf16 on accelerators; parameters may stay float32). Norm statistics, softmax and the
        timestep embedding are float32 always.
      attention_impl: ``jsr.models.attention`` implementation name (``auto`` picks per backend and length).
      remat: gradient checkpointing in training (``jsr.models.remat``): ``"none"``, ``"blocks"`` (each
        down/mid/up block one checkpoint; ``True`` means this), ``"full"`` (the whole forward one checkpoint).
        Parameter names and forward values are the same in every mode.
      remat_policy: a ``jax.checkpoint_policies`` name (``None``: save nothing, recompute all).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool | str = False
    remat_policy: str | None = None

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array, *,
                 conv_in_modulation: tuple[jax.Array, jax.Array] | None = None,
                 capture_attention: Sequence[str] | None = None) -> jax.Array:
        """One UNet evaluation.

        Args:
          sample: [B, H, W, in_channels] noisy latents (unscaled network input, e.g. ``scaling_factor * E(x)``
            plus noise). Any H, W; multiples of ``2 ** (blocks - 1)`` avoid non-x2 upsampling.
          timesteps: float or int, a scalar or [B]; fractional values are allowed (the control knob).
          encoder_hidden_states: [B, L, cross_attention_dim] conditioning of any token count L: CLIP text
            embeddings (77 tokens), or a method's own context, e.g. visual prompt tokens (257 image tokens
            projected to cross_attention_dim). Every ``attn2`` layer attends to it.
          conv_in_modulation: None, or ``(scale, shift)`` arrays broadcastable to conv_in's output
            [B, H, W, block_out_channels[0]] (NHWC; e.g. [B, H, W, C0] maps or [B, 1, 1, C0] vectors): the
            features become ``h * (1 + scale) + shift`` (computed in float32) before the down blocks, and the
            first skip connection is the modulated ``h`` (CODSR's SFT conditioning). None (or zero scale and
            shift) is the plain UNet.
          capture_attention: None, or PyTorch-style module-name substrings selecting ``attn2`` layers
            (``("up_blocks.1.attentions", "mid_block")``; ``("",)`` for all; names as
            :func:`cross_attention_layers`). Static: under ``jax.jit`` close over it or mark it in
            ``static_argnames``. The selected layers compute their probabilities explicitly and sow the head
            mean, [B, Lq, Lk] float32, into the ``"attention_maps"`` collection; pass
            ``mutable=["attention_maps"]`` to ``apply`` and read them with :func:`attention_maps`. None: nothing
            is computed or stored and every attention takes the ``attention_impl`` path. A pattern that selects
            no layer is a ValueError.
        Returns:
          [B, H, W, out_channels] prediction (noise or v) in ``dtype``.
        """
        # Hashable, as the static argument of the "full" checkpoint must be.
        capture = tuple(capture_attention) if isinstance(capture_attention, list) else capture_attention
        if remat_lib.remat_mode(self.remat) == "full":
            # One checkpoint around the whole body: a lifted transform of the compact method keeps every
            # parameter's name. The capture patterns are static (strings).
            body = nn.remat(UNet2DConditionModel._forward, policy=remat_lib.checkpoint_policy(self.remat_policy),
                            static_argnums=(5,))
            return body(self, sample, timesteps, encoder_hidden_states, conv_in_modulation, capture)
        return self._forward(sample, timesteps, encoder_hidden_states, conv_in_modulation, capture)

    @nn.compact
    def _forward(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array,
                 conv_in_modulation: tuple[jax.Array, jax.Array] | None,
                 capture_attention: str | tuple[str, ...] | None) -> jax.Array:
        cfg = self.config
        dt = self.dtype
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, the UNet expects "
                             f"cross_attention_dim={cfg.cross_attention_dim}")
        if sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample has {sample.shape[-1]} channels (NHWC), the UNet expects {cfg.in_channels}")
        context = encoder_hidden_states.astype(dt)

        temb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift).astype(dt)
        temb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=dt, name="time_embedding")(temb)

        x = sample.astype(dt)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        p = cfg.conv_in_kernel // 2
        x = Conv(cfg.block_out_channels[0], kernel_size=(cfg.conv_in_kernel,) * 2, padding=((p, p), (p, p)),
                 dtype=dt, name="conv_in")(x)
        if conv_in_modulation is not None:
            x = _modulate(x, conv_in_modulation)
        x = constraints.image(x)

        capture = None
        if capture_attention is not None:
            # Names are taken relative to this module, wherever it sits in a larger model.
            capture = AttentionCapture(_capture_patterns(capture_attention, cfg), root_depth=len(self.path))
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn,
                      use_linear_projection=cfg.use_linear_projection, dtype=dt,
                      attention_impl=self.attention_impl, capture=capture)
        # "blocks": each down/mid/up block is one checkpoint; its input (and the skips, kept for the up blocks
        # anyway) is what the backward pass keeps. UpBlock2D's upsample size (arg 5) is static.
        blocks = remat_lib.remat_mode(self.remat) == "blocks"
        down_block, mid_block, up_block = (
            remat_lib.checkpointed(cls, blocks, self.remat_policy, static)
            for cls, static in ((DownBlock2D, ()), (MidBlock2DCrossAttn, ()), (UpBlock2D, (5,))))
        n = len(cfg.block_out_channels)
        skips: list[jax.Array] = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, s = down_block(
                cfg.block_out_channels[i], cfg.layers_per_block[i], has_attention=kind == "CrossAttnDownBlock2D",
                heads=cfg.heads[i], transformer_layers=cfg.transformer_layers_per_block[i],
                only_cross_attention=cfg.only_cross_attention[i], add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **common)(x, temb, context)
            x = constraints.image(x)
            skips.extend(constraints.image(h) for h in s)

        if cfg.mid_block_type is not None:
            x = mid_block(
                cfg.block_out_channels[-1], 1, heads=cfg.heads[-1],
                transformer_layers=cfg.transformer_layers_per_block[-1],
                # diffusers' UNetMidBlock2DCrossAttn never uses only_cross_attention (only its SimpleCrossAttn
                # mid block reads mid_block_only_cross_attention).
                only_cross_attention=False,
                output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **common)(x, temb, context)
            x = constraints.image(x)

        rev = lambda seq: tuple(reversed(seq))
        channels, heads, layers = rev(cfg.block_out_channels), rev(cfg.heads), rev(cfg.layers_per_block)
        t_layers, only_cross = rev(cfg.transformer_layers_per_block), rev(cfg.only_cross_attention)
        for i, kind in enumerate(cfg.up_block_types):
            count = layers[i] + 1
            block_skips, skips = skips[-count:], skips[:-count]
            last = i == n - 1
            # Upsample to the next skip's size: x2 for sizes divisible by 2**(n-1), PyTorch's nearest otherwise
            # (diffusers' forward_upsample_size).
            size = None if last else tuple(skips[-1].shape[1:3])
            x = up_block(
                channels[i], count, has_attention=kind == "CrossAttnUpBlock2D", heads=heads[i],
                transformer_layers=t_layers[i], only_cross_attention=only_cross[i], add_upsample=not last,
                name=f"up_blocks_{i}", **common)(x, tuple(block_skips), temb, context, size)
            x = constraints.image(x)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=dt, name="conv_norm_out")(x)
        x = ACTIVATIONS[cfg.act_fn](x)
        p = cfg.conv_out_kernel // 2
        return Conv(cfg.out_channels, kernel_size=(cfg.conv_out_kernel,) * 2, padding=((p, p), (p, p)), dtype=dt,
                    name="conv_out")(x)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(sample [B, s, s, in_channels], timesteps [B], encoder_hidden_states [B, 8, cross_dim]) of the right
        widths, for shape inference (``jsr.models.common``); ``s = 2 ** (blocks - 1)``."""
        s = 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((batch, s, s, self.config.in_channels), jnp.float32),
                jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, 8, self.config.cross_attention_dim), jnp.float32))
