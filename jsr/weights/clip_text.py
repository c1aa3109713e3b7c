"""transformers ``CLIPTextModel`` folders <-> jsr (module, params).

A transformers folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``); a jsr-native
folder (``jsr.weights.native``) holds ``config.json`` and an Orbax ``params/`` checkpoint. ``load_text_encoder``
reads both. Checkpoint keys come with the ``text_model.`` prefix (transformers 4.x and every SD folder) or
without it (transformers 5 ``save_pretrained``); the ``text_model.embeddings.position_ids`` buffer some files
carry is ignored. ``save_text_encoder`` writes the prefixed form, which both transformers generations load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsr.models import common
from jsr.models.clip_text import CLIPTextConfig, CLIPTextModel
from jsr.weights import convert, io, native

# The transformers module list of the text encoder: Flax ``layers_N`` <-> PyTorch ``layers.N``.
CLIP_INDEXED = frozenset({"layers"})
WEIGHTS_NAME = "model.safetensors"
PREFIX = "text_model."
# Buffers (not parameters) found in CLIP checkpoints.
_IGNORE = (r"(^|\.)position_ids$",)


def _strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def text_encoder_from_config(config: dict, dtype: Any = None, attention_impl: str = "auto",
                             remat: bool = False) -> CLIPTextModel:
    """The jsr module for a transformers ``CLIPTextModel`` ``config.json`` dict (``dtype``: compute dtype,
    default float32)."""
    return CLIPTextModel(CLIPTextConfig.from_transformers(config), dtype=dtype or jnp.float32,
                         attention_impl=attention_impl, remat=remat)


def load_text_encoder(folder: str | os.PathLike, dtype: Any = None, attention_impl: str = "auto",
                      remat: bool = False) -> tuple[CLIPTextModel, Any]:
    """Load a CLIP text encoder from a transformers (or jsr-native) folder.

    Args:
      folder: e.g. ``stable-diffusion-2-1-base/text_encoder``.
      dtype: parameter *and* compute dtype (default float32).
      attention_impl: see ``jsr.models.attention``.
      remat: gradient checkpointing per layer.
    Returns:
      ``(module, params)``; ``module.apply({"params": params}, ids)`` with ids [B, 77] int32 (see
      ``jsr.models.clip_text.tokenize``) gives [B, 77, hidden_size].
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor; ValueError for a config
      that is not a CLIP text model.
    """
    module = text_encoder_from_config(io.read_config(folder), dtype, attention_impl, remat)
    abstract = common.abstract_params(module)
    return module, native.read_params(folder, abstract, CLIP_INDEXED, model="text encoder", dtype=dtype,
                                      ignore=_IGNORE, rename=_strip_prefix)


def save_text_encoder(module: CLIPTextModel, params: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``params`` as a transformers ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors``,
    keys prefixed ``text_model.``).

    ``dtype``: tensor dtype in the file (default: the parameters' own). ``config.json`` is the config the module
    was built from with ``architectures``/``model_type`` set. Returns the folder.
    """
    folder = Path(folder)
    config = module.config.to_transformers()
    config["architectures"] = ["CLIPTextModel"]
    config["model_type"] = "clip_text_model"
    # The network's shape fields are authoritative even when the source config left them at defaults.
    cfg = module.config
    config.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                  layer_norm_eps=cfg.layer_norm_eps)
    state = {PREFIX + k: v for k, v in convert.params_to_torch_state(params, CLIP_INDEXED).items()}
    if dtype is not None:
        state = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in state.items()}
    io.write_config(folder, config)
    io.write_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    return folder
