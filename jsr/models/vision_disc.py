"""A vision-aided discriminator: small trainable heads on the tokens of several layers of a *frozen* pretrained
ViT, as CODSR's GAN stage uses (Kumari et al.'s vision-aided GAN; the release takes
``vision_aided_loss.Discriminator(cv_type="dino", output_type="conv_multi_level")``). Two backbones: the CLIP vision
encoder of :mod:`jsr.models.clip_vision` or a plain ViT (:mod:`jsr.models.vit`: DINO v1, what the release uses).

    backbone tokens  = ViT(preprocess(x)) hidden states of layers L_1..L_n             [B, 1 + g^2, D] each
    head_i           = LayerNorm -> the g x g patch-token grid -> 1x1 conv D -> hidden -> LeakyReLU(0.2)
                       -> 3x3 conv hidden -> 1                                          [B, g, g] logits
    D(x)             = (head_1, ..., head_n)                   one logit per patch and level (real > 0)

The backbone never trains: only the heads are parameters of the discriminator (their own tree, their own
optimizer). Gradients still flow through the frozen backbone into the image, so the generator is trained by them.
Our heads are our own design with the same role as vision-aided GAN's multi-level conv heads (their weights are
never imported: the release ships only the generator). Both backbones' hidden states are the blocks' outputs
before any final norm (CLIP has none; the ViT's ``layernorm`` only enters ``last_hidden_state``).

Preprocessing (:func:`backbone_pixels`): images in [-1, 1] -> [0, 1] -> bilinear resize (antialiased) to the
backbone's square input -> ``(x - mean) / std`` with the backbone's statistics (:func:`default_normalization`:
CLIP's for CLIP, ImageNet's for a ViT; a folder's ``preprocessor_config.json`` overrides them, read by
``jsr.weights.preprocessor``). Differentiable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsr.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionModel
from jsr.models.layers import Conv, LayerNorm
from jsr.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig, ViTModel

Dtype = Any
# Either frozen backbone: both take NHWC pixels and return ``hidden_states`` (embeddings, then every block).
Backbone = CLIPVisionModel | ViTModel
BackboneConfig = CLIPVisionConfig | ViTConfig
# Per-channel (mean, std) of [0, 1] RGB pixels.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Shapes of :class:`MultiLevelHeads`.

    Attributes:
      width: the backbone's token width ``D`` (``hidden_size``).
      grid: patch tokens per side ``g`` (``image_size // patch_size``).
      levels: how many hidden states the heads read (one head each).
      hidden: the heads' inner width.
    """

    width: int
    grid: int
    levels: int
    hidden: int = 256

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def default_layers(num_hidden_layers: int, levels: int = 4) -> tuple[int, ...]:
    """Evenly spaced hidden-state indices ending at the last block (1-based: index 0 is the embeddings):
    ``(3, 6, 9, 12)`` for a 12-layer ViT, ``(6, 12, 18, 24)`` for 24 layers, ``(1, 2)`` for 2 layers."""
    levels = max(1, min(levels, num_hidden_layers))
    return tuple(round(num_hidden_layers * (i + 1) / levels) for i in range(levels))


class MultiLevelHeads(nn.Module):
    """One conv head per backbone level: hidden states (each [B, 1 + g^2, D], class token first) -> a tuple of
    [B, g, g] float32 logits."""

    config: HeadsConfig
    dtype: Dtype | None = None

    def example_inputs(self, batch: int = 1) -> tuple[tuple[jax.Array, ...]]:
        c = self.config
        return (tuple(jnp.zeros((batch, 1 + c.grid * c.grid, c.width), jnp.float32) for _ in range(c.levels)),)

    @nn.compact
    def __call__(self, states: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        c = self.config
        if len(states) != c.levels:
            raise ValueError(f"MultiLevelHeads: {c.levels} levels configured, {len(states)} hidden states given")
        out = []
        for i, s in enumerate(states):
            b = s.shape[0]
            if s.shape[1:] != (1 + c.grid * c.grid, c.width):
                raise ValueError(f"MultiLevelHeads level {i}: want [B, {1 + c.grid ** 2}, {c.width}], got {s.shape}")
            h = LayerNorm(1e-5, dtype=self.dtype, name=f"level{i}_norm")(s[:, 1:])
            h = h.reshape(b, c.grid, c.grid, c.width)
            h = Conv(c.hidden, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name=f"level{i}_conv0")(h)
            h = nn.leaky_relu(h, 0.2)
            h = Conv(1, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"level{i}_conv1")(h)
            out.append(h[..., 0].astype(jnp.float32))
        return tuple(out)


def default_normalization(backbone: Backbone) -> Normalization:
    """The statistics a backbone family was trained with: CLIP's mean/std for :class:`CLIPVisionModel`,
    ImageNet's (DINO's) for :class:`ViTModel`."""
    if isinstance(backbone, CLIPVisionModel):
        return CLIP_MEAN, CLIP_STD
    if isinstance(backbone, ViTModel):
        return IMAGENET_MEAN, IMAGENET_STD
    raise TypeError(f"discriminator backbone: {type(backbone).__name__} is neither CLIPVisionModel nor ViTModel")


def backbone_pixels(x: jax.Array, image_size: int, normalization: Normalization = (CLIP_MEAN, CLIP_STD)
                    ) -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] -> normalised [B, S, S, 3] float32, ``(x01 - mean) / std`` (bilinear,
    antialiased; the aspect ratio is not kept: discriminator inputs are square crops)."""
    x = jnp.clip(x.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear", antialias=True)
    mean, std = normalization
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def discriminator_logits(backbone: Backbone, backbone_params: Any, heads_params: Mapping, x: jax.Array,
                         layers: Sequence[int], hidden: int, normalization: Normalization | None = None
                         ) -> tuple[jax.Array, ...]:
    """``D(x)``: per-level patch logits ([B, g, g] float32 each) of images ``x`` [B, H, W, 3] in [-1, 1], the
    heads reading the backbone's ``hidden_states[l]`` for ``l`` in ``layers``; ``normalization`` (mean, std) of
    the backbone's input, default :func:`default_normalization`."""
    cfg = backbone.config
    pixels = backbone_pixels(x, cfg.image_size, normalization or default_normalization(backbone))
    out = backbone.apply({"params": backbone_params}, pixels, output_hidden_states=True)
    states = tuple(out.hidden_states[i] for i in layers)
    heads = MultiLevelHeads(HeadsConfig(cfg.hidden_size, cfg.grid_size, len(layers), hidden))
    return heads.apply({"params": heads_params}, states)


def init_heads_params(rng: jax.Array, backbone_config: BackboneConfig, layers: Sequence[int],
                      hidden: int = 256) -> dict:
    """Fresh head parameters (plain float32 arrays) for a backbone of ``backbone_config`` read at ``layers``."""
    for i in layers:
        if not 0 <= i <= backbone_config.num_hidden_layers:
            raise ValueError(f"discriminator layer {i}: the backbone has hidden states 0..."
                             f"{backbone_config.num_hidden_layers}")
    module = MultiLevelHeads(HeadsConfig(backbone_config.hidden_size, backbone_config.grid_size, len(layers), hidden))
    return jax.jit(lambda key: nn.meta.unbox(module.init(key, *module.example_inputs())["params"]))(rng)
