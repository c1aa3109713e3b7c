"""The plain vision transformer (Hugging Face ``ViTModel``, model_type ``vit``) in Flax linen: DINO v1
(``facebook/dino-vits16``, ``facebook/dino-vitb16``), Google's ViT, and the trunk of ``ViTForImageClassification``.

    cfg = ViTConfig.from_transformers(json.load(open("dino-vitb16/config.json")))
    vit = ViTModel(cfg)
    pixels = (images - IMAGENET_MEAN) / IMAGENET_STD         # images [B, 224, 224, 3] NHWC in [0, 1]
    out = vit.apply({"params": params}, pixels, output_hidden_states=True)
    out.last_hidden_state   # [B, 197, 768] for ViT-B/16 at 224 px: final ``layernorm`` of the last block's output
    out.hidden_states       # 13 x [B, 197, 768]: the embeddings, then every block's output (no final norm)
    out.pooler_output       # [B, 768] tanh(dense(class token)) when the model has a pooler, else None

The network: a biased ``patch_size`` x ``patch_size`` stride-``patch_size`` conv (``patch_embeddings/projection``)
turns the image into a row-major token grid, the learned ``cls_token`` is put in front and the learned
``position_embeddings`` added (both bare ``nn.Parameter`` s in PyTorch, kept in their [1, 1, D] / [1, 1 + N, D]
shapes), then pre-LayerNorm blocks (``layernorm_before`` -> self-attention ``query``/``key``/``value`` (biased
unless ``qkv_bias=False``) -> ``output/dense``, residual; ``layernorm_after`` -> ``intermediate/dense`` -> exact
GELU -> ``output/dense``, residual) and a final ``layernorm`` (eps 1e-12 by default). Unlike CLIP's vision tower
there is no norm before the blocks, and the final norm applies to every token of ``last_hidden_state``.

Parameters are named after the checkpoint keys transformers writes (``save_pretrained`` keeps the 4.x names:
``encoder/layer_3/attention/attention/query``, ``encoder/layer_3/intermediate/dense``...), without the ``vit.``
prefix of ``ViTForImageClassification`` files. The two bare parameters are ``embeddings/cls_token/embedding`` and
``embeddings/position_embeddings/embedding`` here, so the generic converter maps them; ``jsr.weights.vit``
renames them at the checkpoint boundary.

Not built: DINOv2 (``model_type`` ``dinov2``: layer scale, SwiGLU, registers, position embeddings interpolated to
every input size) and ``interpolate_pos_encoding``; inputs must be ``image_size`` square.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models.attention import dot_product_attention
from jsr.models.clip_text import ACTIVATIONS
from jsr.models.common import PatchGrid
from jsr.models.layers import Conv, Dense, LayerNorm

Dtype = Any

# torchvision's ImageNet statistics (what DINO trained with), RGB, for [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architectures whose ViT trunk this module builds; their heads (classifier, MIM decoder) are not built.
ARCHITECTURES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling")
POOLER_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"tanh": jnp.tanh, "relu": jax.nn.relu,
                                                                   **ACTIVATIONS}
_DINOV2 = ("dinov2", "dinov2_with_registers")


def _square(value: Any, name: str) -> int:
    """An ``image_size``/``patch_size`` entry (an int, or an [h, w] pair with h == w) as an int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"ViT config: {name}={list(value)!r}; jsr builds square images and patches only")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig(PatchGrid):
    """The resolved ViT architecture (hashable, as Flax module attributes must be).

    Field names follow transformers' ``ViTConfig`` (defaults: ViT-B/16 at 224 px). ``with_pooler`` builds
    ``pooler/dense`` (``ViTModel(add_pooling_layer=True)``). ``transformers_json`` is the config dict it was built
    from (sorted JSON), written back by ``jsr.weights.vit.save_vit``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    with_pooler: bool = True
    pooler_output_size: int = 768
    pooler_act: str = "tanh"
    transformers_json: str = "{}"

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any], with_pooler: bool | None = None) -> "ViTConfig":
        """Build from a transformers ``config.json`` dict (``model_type`` ``vit``). Missing keys take
        transformers' ``ViTConfig`` defaults; keys that do not change the trunk (dropout, init range,
        ``encoder_stride``, label maps, generic keys) are kept.

        Args:
          cfg: the parsed ``config.json``.
          with_pooler: build the pooler; ``None``: as ``ViTModel`` does by default (only for a ``ViTModel``
            architecture; the classification and MIM models have none).
        Raises:
          ValueError naming the option for a config that is not a ViT (DINOv2 included), or that uses an
          activation, head size or shape jsr does not build.
        """
        cfg = dict(cfg)
        model_type = cfg.get("model_type", "vit")
        if model_type in _DINOV2:
            raise ValueError(f"ViT config: model_type={model_type!r} (DINOv2) is not supported: its layer scale, "
                             "SwiGLU MLP, registers and interpolated position embeddings are not ported; use a "
                             "DINO v1 ViT (model_type 'vit', e.g. facebook/dino-vitb16)")
        if model_type != "vit":
            raise ValueError(f"ViT config: model_type={model_type!r}; jsr builds transformers' ViTModel "
                             "(model_type 'vit', e.g. facebook/dino-vitb16, google/vit-base-patch16-224)")
        archs = cfg.get("architectures") or ["ViTModel"]
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise ValueError(f"ViT config: architectures={archs!r}; jsr builds the ViT trunk of {ARCHITECTURES}")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"ViT config: hidden_act={act!r} is not supported (known: {sorted(ACTIVATIONS)})")
        pooler_act = cfg.get("pooler_act", "tanh")
        if pooler_act not in POOLER_ACTIVATIONS:
            raise ValueError(f"ViT config: pooler_act={pooler_act!r} is not supported "
                             f"(known: {sorted(POOLER_ACTIVATIONS)})")
        width, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 12))
        if width % heads:
            raise ValueError(f"ViT config: hidden_size={width} does not split into num_attention_heads={heads} heads")
        head_dim = cfg.get("head_dim")
        if head_dim is not None and int(head_dim) != width // heads:
            raise ValueError(f"ViT config: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                             f"{width // heads}; jsr builds heads of that width only")
        image_size = _square(cfg.get("image_size", 224), "image_size")
        patch = _square(cfg.get("patch_size", 16), "patch_size")
        if patch < 1 or image_size < patch:
            raise ValueError(f"ViT config: patch_size={patch} does not fit image_size={image_size}")
        if with_pooler is None:
            with_pooler = known[0] == "ViTModel"
        return cls(
            hidden_size=width,
            intermediate_size=int(cfg.get("intermediate_size", 3072)),
            num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
            num_attention_heads=heads,
            num_channels=int(cfg.get("num_channels", 3)),
            image_size=image_size,
            patch_size=patch,
            hidden_act=act,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            qkv_bias=bool(cfg.get("qkv_bias", True)),
            with_pooler=bool(with_pooler),
            pooler_output_size=int(cfg.get("pooler_output_size") or width),
            pooler_act=pooler_act,
            transformers_json=json.dumps(cfg, sort_keys=True),
        )

    def to_transformers(self) -> dict:
        """The transformers config dict this config was built from."""
        return json.loads(self.transformers_json)


class ViTOutput(NamedTuple):
    """What :class:`ViTModel` returns (a pytree, so it passes through ``jit``).

    last_hidden_state: [B, 1 + N, D], the final ``layernorm`` of the last block's output, class token first.
    pooler_output: [B, pooler_output_size], ``pooler_act(dense(last_hidden_state[:, 0]))``, or ``None`` without a
      pooler.
    hidden_states: ``num_hidden_layers + 1`` arrays [B, 1 + N, D] (the embeddings, then each block's output,
      before the final norm) when asked for, else ``None``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


class BareParameter(nn.Module):
    """A PyTorch bare ``nn.Parameter`` (ViT's ``cls_token`` [1, 1, D], ``position_embeddings`` [1, 1 + N, D]),
    stored as ``embedding`` so the generic converter maps it; returns it in ``dtype``."""

    shape: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        axes = (None,) * (len(self.shape) - 1) + ("embed",)
        value = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                           self.shape, jnp.float32)
        return value.astype(self.dtype)


class ViTPatchEmbeddings(nn.Module):
    """The biased patch conv ``projection``: NHWC [B, S, S, C] -> [B, (S/p)^2, D], tokens row-major over the grid
    (the order of PyTorch's NCHW ``flatten(2)``, which the position table assumes)."""

    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        p, d = self.config.patch_size, self.config.hidden_size
        patches = Conv(d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True, dtype=self.dtype,
                       kernel_axes=(None, None, None, "embed"), name="projection")(pixel_values)
        b, gh, gw, _ = patches.shape
        return patches.reshape(b, gh * gw, d)


class ViTEmbeddings(nn.Module):
    """Patch tokens, class token in front, position embeddings added: [B, S, S, C] -> [B, 1 + (S/p)^2, D]."""

    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        tokens = ViTPatchEmbeddings(cfg, dtype=self.dtype, name="patch_embeddings")(pixel_values)
        b = tokens.shape[0]
        cls = BareParameter((1, 1, d), dtype=self.dtype, name="cls_token")()
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens], axis=1)
        return x + BareParameter((1, cfg.num_positions, d), dtype=self.dtype, name="position_embeddings")()


class ViTSelfAttention(nn.Module):
    """``query``/``key``/``value`` projections and scaled dot-product attention over all tokens (no mask):
    [B, L, D] -> [B, L, D] (heads concatenated, before the output projection)."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, n, c = x.shape
        h = cfg.num_attention_heads
        proj = lambda name: Dense(c, use_bias=cfg.qkv_bias, dtype=self.dtype,  # noqa: E731
                                  kernel_axes=("embed", "heads"), name=name)
        q = proj("query")(x).reshape(b, n, h, c // h)
        k = proj("key")(x).reshape(b, n, h, c // h)
        v = proj("value")(x).reshape(b, n, h, c // h)
        return dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, n, c)


class ViTAttention(nn.Module):
    """``attention`` (self-attention) then ``output/dense``: [B, L, D] -> [B, L, D] (no residual here)."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ViTSelfAttention(self.config, dtype=self.dtype, attention_impl=self.attention_impl, name="attention")(x)
        return _Projection(x.shape[-1], ("heads", "embed"), dtype=self.dtype, name="output")(h)


class _Projection(nn.Module):
    """A biased ``dense`` inside a named scope (transformers' ``ViTSelfOutput``/``ViTIntermediate``/``ViTOutput``
    each hold one ``dense``): [..., in] -> [..., features]."""

    features: int
    kernel_axes: tuple[str, str]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(self.features, dtype=self.dtype, kernel_axes=self.kernel_axes, name="dense")(x)


class ViTLayer(nn.Module):
    """Pre-LayerNorm block: ``x + attention(layernorm_before(x))``, then ``x + output(act(intermediate(
    layernorm_after(x))))``. [B, L, D] -> same."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        ln = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + ViTAttention(cfg, dtype=self.dtype, attention_impl=self.attention_impl,
                             name="attention")(ln("layernorm_before")(x))
        h = _Projection(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                        name="intermediate")(ln("layernorm_after")(x))
        h = ACTIVATIONS[cfg.hidden_act](h)
        return x + _Projection(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="output")(h)


class ViTEncoder(nn.Module):
    """The stack ``layer_0 ... layer_{N-1}``: [B, L, D] -> ([B, L, D], the input and every layer's output when
    ``collect``, else ``()``)."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, collect: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        layer = nn.remat(ViTLayer) if self.remat else ViTLayer
        states = [x] if collect else []
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, dtype=self.dtype, attention_impl=self.attention_impl, name=f"layer_{i}")(x)
            if collect:
                states.append(x)
        return x, tuple(states)


class ViTModel(nn.Module):
    """Hugging Face ``ViTModel`` (the trunk of ``ViTForImageClassification`` too).

    Attributes:
      config: the architecture (:class:`ViTConfig`).
      dtype: compute dtype; LayerNorm statistics and the attention softmax are float32 always.
      attention_impl: ``jsr.models.attention`` implementation.
      remat: recompute each layer in the backward pass.
    """

    config: ViTConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> ViTOutput:
        """Encode images.

        Args:
          pixel_values: [B, S, S, num_channels] NHWC with S = ``config.image_size``, already normalised (DINO:
            ``(x - IMAGENET_MEAN) / IMAGENET_STD`` of [0, 1] pixels; a folder's ``preprocessor_config.json`` says
            which statistics its model expects, ``jsr.weights.preprocessor``).
          output_hidden_states: also return every layer's hidden state (for feature discriminators).
        Returns:
          :class:`ViTOutput` in ``dtype``.
        Raises:
          ValueError for an input that is not [B, image_size, image_size, num_channels].
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"ViT expects NHWC pixels [B, {want[0]}, {want[1]}, {want[2]}], got shape "
                             f"{tuple(pixel_values.shape)} (position embeddings are not interpolated: resize first)")
        x = ViTEmbeddings(cfg, dtype=self.dtype, name="embeddings")(pixel_values)
        x, states = ViTEncoder(cfg, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat,
                               name="encoder")(x, output_hidden_states)
        x = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
        pooled = None
        if cfg.with_pooler:
            pooled = _Projection(cfg.pooler_output_size, ("embed", None), dtype=self.dtype, name="pooler")(x[:, 0])
            pooled = POOLER_ACTIVATIONS[cfg.pooler_act](pooled)
        return ViTOutput(x, pooled, states if output_hidden_states else None)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Pixels [B, image_size, image_size, num_channels] (zeros), for shape inference (``jsr.models.common``)."""
        cfg = self.config
        return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
