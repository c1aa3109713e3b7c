"""transformers CLIP vision folders <-> jsr (module, params).

``load_clip_vision`` reads a ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` folder, a full ``CLIPModel``
folder such as ``openai/clip-vit-large-patch14`` (its text tower, ``text_projection`` and ``logit_scale`` are
skipped, as transformers' ``CLIPVisionModel.from_pretrained`` does) or a jsr-native folder. Checkpoint keys come
with the ``vision_model.`` prefix (transformers 4.x, full CLIP checkpoints, ``...WithProjection``) or without it
(transformers 5 ``CLIPVisionModel.save_pretrained``); ``visual_projection.weight`` is never prefixed, and the
``position_ids`` buffer some files carry is ignored. ``save_clip_vision`` writes the prefixed form, which both
transformers generations load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsr.models import common
from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from jsr.weights import convert, io, native

# The transformers module list of the encoder: Flax ``layers_N`` <-> PyTorch ``layers.N``.
CLIP_VISION_INDEXED = frozenset({"layers"})
WEIGHTS_NAME = "model.safetensors"
PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
# PyTorch's bare class-token parameter, and the key the generic converter gives its Flax counterpart
# (``embeddings/class_embedding/embedding``).
_CLASS_TORCH = "embeddings.class_embedding"
_CLASS_FLAX = _CLASS_TORCH + ".weight"
# Buffers (not parameters) found in CLIP checkpoints.
_IGNORE = (r"(^|\.)position_ids$",)
# The rest of a full CLIPModel checkpoint.
_IGNORE_FULL_CLIP = (r"^text_model\.", r"^text_projection\.", r"^logit_scale$")


def _from_checkpoint_key(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return _CLASS_FLAX if key == _CLASS_TORCH else key


def _to_checkpoint_key(key: str) -> str:
    if key == PROJECTION:
        return key
    return PREFIX + (_CLASS_TORCH if key == _CLASS_FLAX else key)


def clip_vision_from_config(config: dict, dtype: Any = None, attention_impl: str = "auto", remat: bool = False,
                            with_projection: bool | None = None) -> CLIPVisionModel:
    """The jsr module for a transformers CLIP vision (or full CLIP) ``config.json`` dict (``dtype``: compute
    dtype, default float32; ``with_projection``: see :meth:`CLIPVisionConfig.from_transformers`)."""
    return CLIPVisionModel(CLIPVisionConfig.from_transformers(config, with_projection), dtype=dtype or jnp.float32,
                           attention_impl=attention_impl, remat=remat)


def load_clip_vision(folder: str | os.PathLike, dtype: Any = None, attention_impl: str = "auto",
                     remat: bool = False, with_projection: bool | None = None) -> tuple[CLIPVisionModel, Any]:
    """Load a CLIP vision encoder from a transformers (or jsr-native) folder.

    Args:
      folder: a ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / full ``CLIPModel`` folder
        (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), e.g. ``clip-vit-large-patch14``.
      dtype: parameter *and* compute dtype (default float32).
      attention_impl: see ``jsr.models.attention``.
      remat: gradient checkpointing per layer.
      with_projection: also load ``visual_projection`` (``image_embeds``); ``None``: only for a
        ``CLIPVisionModelWithProjection`` config. ``True`` on a full CLIP folder takes CLIP's image projection.
    Returns:
      ``(module, params)``; ``module.apply({"params": params}, pixels)`` with pixels [B, S, S, 3] NHWC
      (``jsr.models.clip_vision.clip_preprocess``) gives a ``CLIPVisionOutput``.
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor; ValueError for a config
      that is not a CLIP vision model.
    """
    config = io.read_config(folder)
    module = clip_vision_from_config(config, dtype, attention_impl, remat, with_projection)
    ignore = list(_IGNORE)
    if config.get("model_type") == "clip":
        ignore += _IGNORE_FULL_CLIP
        if not module.config.with_projection:
            ignore.append(r"^visual_projection\.")
    abstract = common.abstract_params(module)
    return module, native.read_params(folder, abstract, CLIP_VISION_INDEXED, model="CLIP vision encoder",
                                      dtype=dtype, ignore=ignore, rename=_from_checkpoint_key)


def save_clip_vision(module: CLIPVisionModel, params: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``params`` as a transformers ``CLIPVisionModel`` folder (``CLIPVisionModelWithProjection`` when the
    module has ``visual_projection``): ``config.json`` + ``model.safetensors`` with keys prefixed
    ``vision_model.`` (``visual_projection.weight`` unprefixed), loadable by ``from_pretrained``.

    ``dtype``: tensor dtype in the file (default: the parameters' own). ``config.json`` is the vision config the
    module was built from, with ``architectures``/``model_type`` and the shape fields set. Returns the folder.
    """
    folder = Path(folder)
    cfg = module.config
    config = cfg.to_transformers()
    config["architectures"] = ["CLIPVisionModelWithProjection" if cfg.with_projection else "CLIPVisionModel"]
    config["model_type"] = "clip_vision_model"
    # The network's shape fields are authoritative even when the source config left them at defaults.
    config.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.projection_dim)
    state = {_to_checkpoint_key(k): v
             for k, v in convert.params_to_torch_state(params, CLIP_VISION_INDEXED).items()}
    if dtype is not None:
        state = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in state.items()}
    io.write_config(folder, config)
    io.write_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    return folder
