"""diffusers ``UNet2DConditionModel`` folders <-> jsr (module, params).

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``); a jsr-native
folder (``jsr.weights.native``) holds ``config.json`` and an Orbax ``params/`` checkpoint. ``load_unet`` reads
both; ``save_unet`` writes the diffusers form, which ``diffusers.UNet2DConditionModel.from_pretrained`` loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsr.models import common
from jsr.models.unet import UNet2DConditionModel, UNetConfig
from jsr.weights import convert, io, native

# The diffusers module lists of the UNet: Flax ``name_N`` <-> PyTorch ``name.N``.
UNET_INDEXED = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                          "transformer_blocks", "to_out", "net"})
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def unet_from_config(config: dict, dtype: Any = None, attention_impl: str = "auto",
                     remat: bool = False) -> UNet2DConditionModel:
    """The jsr module for a diffusers UNet ``config.json`` dict (``dtype``: compute dtype, default float32)."""
    return UNet2DConditionModel(UNetConfig.from_diffusers(config), dtype=dtype or jnp.float32,
                                attention_impl=attention_impl, remat=remat)


def load_unet(folder: str | os.PathLike, dtype: Any = None, attention_impl: str = "auto",
              remat: bool = False) -> tuple[UNet2DConditionModel, Any]:
    """Load a UNet from a diffusers (or jsr-native) folder.

    Args:
      folder: e.g. ``stable-diffusion-2-1-base/unet``.
      dtype: parameter *and* compute dtype (default float32). For bf16 compute over float32 parameters, load
        with the default and build ``module.clone(dtype=jnp.bfloat16)``.
      attention_impl: see ``jsr.models.attention``.
      remat: gradient checkpointing per ResNet/Transformer block.
    Returns:
      ``(module, params)``; ``module.apply({"params": params}, sample_nhwc, t, context)``.
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor; ValueError for a config
      outside the SD 1.x/2.x family.
    """
    module = unet_from_config(io.read_config(folder), dtype, attention_impl, remat)
    abstract = common.abstract_params(module)
    return module, native.read_params(folder, abstract, UNET_INDEXED, model="UNet", dtype=dtype)


def save_unet(module: UNet2DConditionModel, params: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``params`` as a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``dtype``: tensor dtype in the file (default: the parameters' own). ``config.json`` is the original diffusers
    config the module was built from, with ``_class_name`` set. Returns the folder.
    """
    folder = Path(folder)
    config = module.config.to_diffusers()
    config["_class_name"] = "UNet2DConditionModel"
    state = convert.params_to_torch_state(params, UNET_INDEXED)
    if dtype is not None:
        state = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in state.items()}
    io.write_config(folder, config)
    io.write_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    return folder
