"""The CLIP vision transformer (Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``) in Flax
linen, and CLIP image preprocessing in JAX.

    cfg = CLIPVisionConfig.from_transformers(json.load(open("clip-vit-large-patch14/config.json")))
    clip = CLIPVisionModel(cfg)
    pixels = clip_preprocess(images, mode="clip")            # images [B, H, W, 3] in [0, 1] -> [B, 224, 224, 3]
    out = clip.apply({"params": params}, pixels, output_hidden_states=True)
    out.last_hidden_state   # [B, 257, 1024] for ViT-L/14 at 224 px (class token first, then 16 x 16 patches)
    out.pooler_output       # [B, 1024]: post_layernorm(class token)
    out.hidden_states       # 25 x [B, 257, 1024]: the embeddings (after pre_layrnorm), then every layer's output

The network: a ``patch_size`` x ``patch_size`` stride-``patch_size`` conv without bias (``patch_embedding``) turns
the image into a grid of tokens (row-major, as PyTorch's ``flatten(2)``), a learned ``class_embedding`` token is
put in front, learned ``position_embedding`` s are added, then ``pre_layrnorm`` (transformers' spelling), the
pre-LayerNorm transformer blocks of :mod:`jsr.models.clip_text` without a mask (every token sees every token),
and ``post_layernorm`` on the class token only. ``last_hidden_state`` is the last block's output *without* a
final norm, as in transformers. ``CLIPVisionModelWithProjection`` adds ``visual_projection`` (a bias-free linear
map of the pooled token, ``image_embeds``); ``CLIPVisionConfig.with_projection`` builds it.

Parameters are named after transformers' attributes without the ``vision_model.`` prefix
(``embeddings/patch_embedding/kernel``, ``encoder/layers_3/self_attn/q_proj``, ``pre_layrnorm``...). The class
token, a bare ``nn.Parameter`` in PyTorch, is ``embeddings/class_embedding/embedding`` here so that the generic
converter maps it; ``jsr.weights.clip_vision`` renames it at the checkpoint boundary.

Preprocessing (:func:`clip_preprocess`) has two modes: ``"clip"``, CLIPImageProcessor's resize-crop-normalise for
off-the-shelf CLIP, and ``"release"``, what RCOD's released code feeds its visual-prompt encoder (a plain
224 x 224 bilinear resize of the LQ image in [-1, 1], no CLIP normalisation).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models.clip_text import ACTIVATIONS, CLIPEncoderLayer, Embed
from jsr.models.common import PatchGrid
from jsr.models.layers import Conv, Dense, LayerNorm

Dtype = Any

# OpenAI CLIP's training statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), RGB, for [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("clip", "release")

# Architectures whose vision tower this module builds, and whether each carries ``visual_projection`` by default.
_ARCHITECTURES = {"CLIPVisionModel": False, "CLIPVisionModelWithProjection": True, "CLIPModel": False}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(PatchGrid):
    """The resolved vision-transformer architecture (hashable, as Flax module attributes must be).

    Field names follow transformers' ``CLIPVisionConfig`` (defaults: ViT-B/32). ``with_projection`` adds
    ``visual_projection`` [hidden_size -> projection_dim] (``CLIPVisionModelWithProjection``).
    ``transformers_json`` is the vision config dict it was built from (sorted JSON), written back by
    ``jsr.weights.clip_vision.save_clip_vision``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    with_projection: bool = False
    transformers_json: str = "{}"

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any], with_projection: bool | None = None) -> "CLIPVisionConfig":
        """Build from a transformers ``config.json`` dict: a ``CLIPVisionModel`` /
        ``CLIPVisionModelWithProjection`` config (``model_type`` ``clip_vision_model``) or a full ``CLIPModel``
        config (``model_type`` ``clip``, e.g. ``openai/clip-vit-large-patch14``), whose ``vision_config`` and
        top-level ``projection_dim`` are used. Missing keys take transformers' ``CLIPVisionConfig`` defaults;
        keys that do not change the network (dropout, init ranges, dtype, transformers' generic keys) are kept.

        Args:
          cfg: the parsed ``config.json``.
          with_projection: build ``visual_projection``; ``None``: only for ``CLIPVisionModelWithProjection``.
        Raises:
          ValueError naming the option for a config that is not a CLIP vision model, or that uses an activation
          or shape jsr does not build.
        """
        cfg = dict(cfg)
        model_type = cfg.get("model_type", "clip_vision_model")
        archs = cfg.get("architectures") or (["CLIPModel"] if model_type == "clip" else ["CLIPVisionModel"])
        known = [a for a in archs if a in _ARCHITECTURES]
        if not known:
            raise ValueError(f"vision encoder config: architectures={archs!r}; jsr builds "
                             f"{sorted(_ARCHITECTURES)} (the vision tower, optionally its projection)")
        if model_type == "clip":
            vision = dict(cfg.get("vision_config") or {})
            # CLIPModel's visual_projection maps to the *top-level* projection_dim.
            vision["projection_dim"] = cfg.get("projection_dim", vision.get("projection_dim", 512))
            vision.setdefault("model_type", "clip_vision_model")
        elif model_type == "clip_vision_model":
            vision = cfg
        else:
            raise ValueError(f"vision encoder config: model_type={model_type!r}; jsr builds transformers' "
                             "CLIPVisionModel (model_type 'clip_vision_model', or a full 'clip' config)")
        if with_projection is None:
            with_projection = _ARCHITECTURES[known[0]]
        act = vision.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"vision encoder config: hidden_act={act!r} is not supported "
                             f"(known: {sorted(ACTIVATIONS)})")
        width, heads = int(vision.get("hidden_size", 768)), int(vision.get("num_attention_heads", 12))
        if width % heads:
            raise ValueError(f"vision encoder config: hidden_size={width} does not split into "
                             f"num_attention_heads={heads} heads")
        image_size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))
        if patch < 1 or image_size < patch:
            raise ValueError(f"vision encoder config: patch_size={patch} does not fit image_size={image_size}")
        return cls(
            hidden_size=width,
            intermediate_size=int(vision.get("intermediate_size", 3072)),
            num_hidden_layers=int(vision.get("num_hidden_layers", 12)),
            num_attention_heads=heads,
            num_channels=int(vision.get("num_channels", 3)),
            image_size=image_size,
            patch_size=patch,
            hidden_act=act,
            layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
            projection_dim=int(vision.get("projection_dim", 512)),
            with_projection=bool(with_projection),
            transformers_json=json.dumps(vision, sort_keys=True),
        )

    def to_transformers(self) -> dict:
        """The transformers vision config dict this config was built from."""
        return json.loads(self.transformers_json)


class CLIPVisionOutput(NamedTuple):
    """What :class:`CLIPVisionModel` returns (a pytree, so it passes through ``jit``).

    last_hidden_state: [B, 1 + N, D], the last block's output (no final norm), class token first.
    pooler_output: [B, D], ``post_layernorm`` of the class token.
    hidden_states: ``num_hidden_layers + 1`` arrays [B, 1 + N, D] (the embeddings after ``pre_layrnorm``, then
      each block's output; the last equals ``last_hidden_state``) when asked for, else ``None``.
    image_embeds: [B, projection_dim], ``visual_projection(pooler_output)``, with a projection, else ``None``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


class ClassEmbedding(nn.Module):
    """The learned class token ``embedding`` [D] (a bare ``nn.Parameter`` in PyTorch), broadcast to [B, 1, D]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: int) -> jax.Array:
        token = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                           (self.features,), jnp.float32)
        return jnp.broadcast_to(token.astype(self.dtype), (batch, 1, self.features))


class CLIPVisionEmbeddings(nn.Module):
    """Patch tokens plus class token plus position embeddings: NHWC [B, S, S, C] -> [B, 1 + (S/p)^2, D]."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = Conv(cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
                       dtype=self.dtype, kernel_axes=(None, None, None, "embed"), name="patch_embedding")(pixel_values)
        b, gh, gw, d = patches.shape
        # Row-major over the grid: the order of PyTorch's NCHW ``flatten(2)``, which the position table assumes.
        tokens = patches.reshape(b, gh * gw, d)
        cls = ClassEmbedding(d, dtype=self.dtype, name="class_embedding")(b)
        x = jnp.concatenate([cls, tokens], axis=1)
        pos = Embed(cfg.num_positions, d, dtype=self.dtype, axes=(None, "embed"),
                    name="position_embedding")(jnp.arange(cfg.num_positions))
        return x + pos[None]


class CLIPVisionEncoder(nn.Module):
    """The stack ``layers_0 ... layers_{N-1}`` of :class:`jsr.models.clip_text.CLIPEncoderLayer` without a mask.
    [B, L, D] -> ([B, L, D], the input and every layer's output when ``collect``, else ``()``)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, collect: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        # The text encoder's layer reads only the shape fields this config shares with CLIPTextConfig.
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        states = [x] if collect else []
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, dtype=self.dtype, attention_impl=self.attention_impl, name=f"layers_{i}")(x, None)
            if collect:
                states.append(x)
        return x, tuple(states)


class CLIPVisionModel(nn.Module):
    """Hugging Face ``CLIPVisionModel`` (and, with ``config.with_projection``, ``CLIPVisionModelWithProjection``).

    Attributes:
      config: the architecture (:class:`CLIPVisionConfig`).
      dtype: compute dtype; LayerNorm statistics and the attention softmax are float32 always.
      attention_impl: ``jsr.models.attention`` implementation (257 tokens: ``auto`` takes the chunked path on
        CPU and the plain one on GPU/TPU in float32).
      remat: recompute each layer in the backward pass.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Encode images.

        Args:
          pixel_values: [B, S, S, num_channels] NHWC with S = ``config.image_size``, already preprocessed
            (:func:`clip_preprocess`: CLIP-normalised for ``"clip"``, roughly [-1, 1] for ``"release"``).
          output_hidden_states: also return every layer's hidden state (for feature discriminators).
        Returns:
          :class:`CLIPVisionOutput` in ``dtype``.
        Raises:
          ValueError for an input that is not [B, image_size, image_size, num_channels].
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIP vision encoder expects NHWC pixels [B, {want[0]}, {want[1]}, {want[2]}], got "
                             f"shape {tuple(pixel_values.shape)} (resize with clip_preprocess first)")
        x = CLIPVisionEmbeddings(cfg, dtype=self.dtype, name="embeddings")(pixel_values)
        x = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x, states = CLIPVisionEncoder(cfg, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat,
                                      name="encoder")(x, output_hidden_states)
        pooled = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])
        embeds = None
        if cfg.with_projection:
            embeds = Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, kernel_axes=("embed", None),
                           name="visual_projection")(pooled)
        return CLIPVisionOutput(x, pooled, states if output_hidden_states else None, embeds)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Pixels [B, image_size, image_size, num_channels] (zeros), for shape inference (``jsr.models.common``)."""
        cfg = self.config
        return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


def _check_images(images: jax.Array) -> jax.Array:
    if images.ndim != 4:
        raise ValueError(f"CLIP preprocessing expects NHWC images [B, H, W, C], got shape {tuple(images.shape)}")
    images = jnp.asarray(images)
    # Integer or half-precision input is resampled in float32; float64 stays so where x64 is enabled.
    if not jnp.issubdtype(images.dtype, jnp.floating) or jnp.finfo(images.dtype).bits < 32:
        images = images.astype(jnp.float32)
    return images


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side ``size`` and the longer ``int(size * long / short)``
    (truncated, as transformers' ``get_resize_output_image_size``)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest_side(images: jax.Array, size: int = 224) -> jax.Array:
    """Bicubic (Keys, a = -0.5) resize so that the shorter side is ``size`` (see :func:`shortest_side_size`),
    antialiased when shrinking (the kernel widened by the scale, as PIL does), clipped to [0, 1] as PIL's 8-bit
    output is.

    images: [B, H, W, C] NHWC in [0, 1] -> [B, H', W', C] float32 (or wider).
    """
    images = _check_images(images)
    h, w = shortest_side_size(images.shape[1], images.shape[2], size)
    out = jax.image.resize(images, (images.shape[0], h, w, images.shape[3]), "bicubic", antialias=True,
                           precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(out, 0.0, 1.0)


def center_crop(images: jax.Array, size: int = 224) -> jax.Array:
    """The central ``size`` x ``size`` window, offsets ``(H - size) // 2`` and ``(W - size) // 2`` (transformers'
    rounding). images: [B, H, W, C] with H, W >= size -> [B, size, size, C]."""
    h, w = images.shape[1], images.shape[2]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def clip_normalize(images: jax.Array) -> jax.Array:
    """``(x - CLIP_MEAN) / CLIP_STD`` per RGB channel: [..., 3] in [0, 1] -> same shape, about [-1.8, 2.2]."""
    images = _check_images(images) if images.ndim == 4 else images
    mean = jnp.asarray(CLIP_MEAN, images.dtype)
    std = jnp.asarray(CLIP_STD, images.dtype)
    return (images - mean) / std


def clip_preprocess(images: jax.Array, size: int = 224, mode: str = "clip") -> jax.Array:
    """CLIP vision-encoder input from RGB images, in JAX (jit-able and differentiable).

    Args:
      images: [B, H, W, 3] NHWC RGB in [0, 1].
      size: the encoder's ``image_size`` (224 for the OpenAI checkpoints).
      mode:
        ``"clip"``: ``transformers.CLIPImageProcessor`` (the PIL pipeline, ``CLIPImageProcessorPil`` in
        transformers 5): bicubic resize of the shorter side to ``size`` (:func:`resize_shortest_side`), centre
        crop ``size`` x ``size``, then :func:`clip_normalize`. Given the same resized image, crop and
        normalisation match transformers to float rounding (< 1e-5). The resize equals PIL's bicubic on float
        ("F" mode) images (max abs. difference ~1e-5 in [0, 1]); the processor resizes 8-bit images, whose
        two-pass resampling rounds and clips between passes, so end to end the two differ by up to ~5/255 in
        [0, 1] (~0.07 after normalisation; mean ~0.004) on skimage's sample photos (see
        ``tests/test_clip_vision.py``).
        ``"release"``: what RCOD's released code (``RCOD_O/rcod_o_model.py``, ``encode_prompt``) feeds its
        CLIP ViT-L/14: the LQ image mapped to [-1, 1] (``2 x - 1``, its SD pixel range) and squashed to
        ``size`` x ``size`` with torchvision's ``Resize((224, 224))``: bilinear, half-pixel centres, antialiased
        when shrinking, aspect ratio *not* kept, no crop and no CLIP mean/std.
    Returns:
      [B, size, size, 3] float32 (or wider) pixels for :class:`CLIPVisionModel`.
    Raises:
      ValueError for an unknown mode or a non-NHWC input.
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"clip_preprocess: mode={mode!r}; choose one of {PREPROCESS_MODES}")
    images = _check_images(images)
    if mode == "clip":
        return clip_normalize(center_crop(resize_shortest_side(images, size), size))
    # Bilinear weights sum to one, so mapping to [-1, 1] before or after the resize is the same.
    signed = images * 2.0 - 1.0
    return jax.image.resize(signed, (images.shape[0], size, size, images.shape[3]), "bilinear", antialias=True,
                            precision=jax.lax.Precision.HIGHEST)
