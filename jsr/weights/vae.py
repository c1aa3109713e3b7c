"""diffusers ``AutoencoderKL`` folders <-> jsr (module, params).

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``); a jsr-native
folder (``jsr.weights.native``) holds ``config.json`` and an Orbax ``params/`` checkpoint. ``load_vae`` reads
both; ``save_vae`` writes the diffusers form, which ``diffusers.AutoencoderKL.from_pretrained`` loads.

Old checkpoints name the mid-block attention ``query``/``key``/``value``/``proj_attn`` (diffusers before 0.14),
the CompVis-converted ones sometimes with [out, in, 1, 1] 1x1-conv weights: both load (renamed here, reshaped by
``jsr.weights.convert.to_flax_layout``). Saving always writes the current names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jsr.models import common
from jsr.models.vae import AutoencoderKL, VAEConfig
from jsr.weights import convert, io, native

# The diffusers module lists of the VAE: Flax ``name_N`` <-> PyTorch ``name.N``.
VAE_INDEXED = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                         "to_out"})
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_LEGACY_ATTENTION = re.compile(r"^(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_rename(key: str) -> str:
    """Current diffusers name of a (possibly pre-0.14) VAE state-dict key: mid-block attention
    ``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0``; every other key unchanged."""
    m = _LEGACY_ATTENTION.match(key)
    if m is None:
        return key
    return f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}"


def vae_from_config(config: dict, dtype: Any = None, attention_impl: str = "auto",
                    remat: bool = False) -> AutoencoderKL:
    """The jsr module for a diffusers VAE ``config.json`` dict (``dtype``: compute dtype, default float32)."""
    return AutoencoderKL(VAEConfig.from_diffusers(config), dtype=dtype or jnp.float32,
                         attention_impl=attention_impl, remat=remat)


def load_vae(folder: str | os.PathLike, dtype: Any = None, attention_impl: str = "auto",
             remat: bool = False) -> tuple[AutoencoderKL, Any]:
    """Load an ``AutoencoderKL`` from a diffusers (or jsr-native) folder.

    Args:
      folder: e.g. ``stable-diffusion-2-1-base/vae``.
      dtype: parameter *and* compute dtype (default float32). For bf16 compute over float32 parameters, load
        with the default and build ``module.clone(dtype=jnp.bfloat16)``.
      attention_impl: mid-block attention implementation (``jsr.models.attention``).
      remat: gradient checkpointing per ResNet/attention block.
    Returns:
      ``(module, params)``; ``module.apply({"params": params}, x, method="encode")`` with x NHWC in [-1, 1].
      The latent scale is ``module.config.scaling_factor``.
    Raises:
      CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor; ValueError for a config
      that is not an SD-family ``AutoencoderKL``.
    """
    module = vae_from_config(io.read_config(folder), dtype, attention_impl, remat)
    abstract = common.abstract_params(module)
    return module, native.read_params(folder, abstract, VAE_INDEXED, model="VAE", dtype=dtype,
                                      rename=legacy_rename)


def save_vae(module: AutoencoderKL, params: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write ``params`` as a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    ``dtype``: tensor dtype in the file (default: the parameters' own). ``config.json`` is the diffusers config
    the module was built from, with ``_class_name`` set. Returns the folder.
    """
    folder = Path(folder)
    config = module.config.to_diffusers()
    config["_class_name"] = "AutoencoderKL"
    state = convert.params_to_torch_state(params, VAE_INDEXED)
    if dtype is not None:
        state = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in state.items()}
    io.write_config(folder, config)
    io.write_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    return folder
