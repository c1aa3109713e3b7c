"""transformers ViT folders (model_type ``vit``: DINO v1, Google ViT) <-> jsr (module, params).

``load_vit`` reads a ``ViTModel`` folder (keys without prefix, as ``ViTModel.save_pretrained`` and the DINO
checkpoints store them), a ``ViTForImageClassification`` / ``ViTForMaskedImageModeling`` folder (keys under
``vit.``; the classifier, the MIM decoder and the mask token are skipped) or a jsr-native folder. The pooler is
optional: it is built when the file holds ``pooler.dense.*`` (DINO's files do not), so a checkpoint without one
loads without random stand-ins. ``save_vit`` writes the ``ViTModel`` form, which ``ViTModel.from_pretrained`` loads
(``add_pooling_layer=False`` for a module without pooler).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsr.models import common
from jsr.models.vit import ViTConfig, ViTModel
from jsr.weights import convert, io, native

# The transformers module list of the encoder: Flax ``layer_N`` <-> PyTorch ``layer.N``.
VIT_INDEXED = frozenset({"layer"})
WEIGHTS_NAME = "model.safetensors"
PREFIX = "vit."
POOLER_KEY = "pooler.dense.weight"
# PyTorch's bare parameters and the keys the generic converter gives their Flax holders (``.../embedding``).
_BARE = ("embeddings.cls_token", "embeddings.position_embeddings")
# Heads of the task models and the MIM mask token: not part of the trunk.
_IGNORE = (r"^classifier\.", r"^decoder\.", r"^embeddings\.mask_token$")


def _from_checkpoint_key(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return key + ".weight" if key in _BARE else key


def _to_checkpoint_key(key: str) -> str:
    stem = key.removesuffix(".weight")
    return stem if stem in _BARE else key


def vit_from_config(config: dict, dtype: Any = None, attention_impl: str = "auto", remat: bool = False,
                    with_pooler: bool | None = None) -> ViTModel:
    """The jsr module for a transformers ViT ``config.json`` dict (``dtype``: compute dtype, default float32;
    ``with_pooler``: see :meth:`ViTConfig.from_transformers`)."""
    return ViTModel(ViTConfig.from_transformers(config, with_pooler), dtype=dtype or jnp.float32,
                    attention_impl=attention_impl, remat=remat)


def load_vit(folder: str | os.PathLike, dtype: Any = None, attention_impl: str = "auto", remat: bool = False,
             with_pooler: bool | None = None) -> tuple[ViTModel, Any]:
    """Load a ViT from a transformers (or jsr-native) folder.

    Args:
      folder: a ``ViTModel`` / ``ViTForImageClassification`` folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), e.g. ``facebook/dino-vitb16``.
      dtype: parameter *and* compute dtype (default float32).
      attention_impl: see ``jsr.models.attention``.
      remat: gradient checkpointing per layer.
      with_pooler: ``None``: build the pooler when the checkpoint holds it (a jsr-native folder: when its config
        is a ``ViTModel``); ``False``: skip the file's pooler; ``True``: require it.
    Returns:
      ``(module, params)``; ``module.apply({"params": params}, pixels, output_hidden_states=True)`` with
      normalised pixels [B, S, S, 3] NHWC gives a ``jsr.models.vit.ViTOutput``.
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor; ValueError for a config
      that is not a ViT (a CLIP or DINOv2 folder, say).
    """
    config = io.read_config(folder)
    ViTConfig.from_transformers(config)  # a CLIP/DINOv2 folder fails here, before its weights are read
    if native.is_native(folder):
        module = vit_from_config(config, dtype, attention_impl, remat, with_pooler)
        return module, native.read_native(folder, common.abstract_params(module), model="ViT",
                                          dtype=dtype or jnp.float32)
    state = {_from_checkpoint_key(k): v for k, v in io.read_state_dict(folder).items()}
    ignore = list(_IGNORE)
    if with_pooler is None:
        with_pooler = POOLER_KEY in state
    elif not with_pooler:
        ignore.append(r"^pooler\.")
    module = vit_from_config(config, dtype, attention_impl, remat, with_pooler)
    params = convert.torch_state_to_params(state, common.abstract_params(module), VIT_INDEXED,
                                           model=f"ViT ({folder})", dtype=dtype, ignore=ignore)
    return module, params


def save_vit(module: ViTModel, params: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``params`` as a transformers ``ViTModel`` folder: ``config.json`` + ``model.safetensors`` with
    unprefixed keys (``embeddings.cls_token``, ``encoder.layer.0.attention.attention.query.weight``...),
    loadable by ``ViTModel.from_pretrained`` (pass ``add_pooling_layer=False`` when the module has no pooler).

    ``dtype``: tensor dtype in the file (default: the parameters' own). ``config.json`` is the config the module
    was built from, with ``architectures``/``model_type`` and the shape fields set. Returns the folder.
    """
    folder = Path(folder)
    cfg = module.config
    config = cfg.to_transformers()
    config.update(architectures=["ViTModel"], model_type="vit", hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_channels=cfg.num_channels,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
                  layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias,
                  pooler_output_size=cfg.pooler_output_size, pooler_act=cfg.pooler_act)
    state = {_to_checkpoint_key(k): v for k, v in convert.params_to_torch_state(params, VIT_INDEXED).items()}
    if dtype is not None:
        state = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in state.items()}
    io.write_config(folder, config)
    io.write_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    return folder
