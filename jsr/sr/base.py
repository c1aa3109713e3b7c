"""The frozen base every restorer shares: UNet, VAE, text encoder (+ tokenizer) and schedule of one SD folder.

    base = load_base("stable-diffusion-2-1-base", dtype=jnp.bfloat16)
    x_sr, z = generator.osediff_restore(base.models, base.unet_params, base.vae_params, unet_lora, vae_lora,
                                        x_lq, base.prompts(["a photo"]))

``path=""`` loads the embedded tiny random SD folder (``jsr.weights.tiny``), written on first use.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jsr.sr.generator import SDModels
from jsr.sr.prompts import PromptEncoder
from jsr.sr.schedule import load_schedule


@dataclasses.dataclass
class Base:
    """Modules + frozen parameters of one SD model.

    Attributes:
      models: the static half (modules, schedule, latent scale), hashable for jit.
      unet_params, vae_params: frozen base parameters (stored in ``param_dtype``).
      prompts: prompt -> embedding encoder with a per-prompt cache.
      path: the folder it came from.
      random_weights: the folder holds random weights written by ``jsr.weights.tiny.write_tiny_sd`` (its
        ``model_index.json`` names a ``_jsr_preset``): training may then stand in random teachers and a random
        LPIPS trunk for missing files, since no result of such a run means anything anyway.
    """

    models: SDModels
    unet_params: Any
    vae_params: Any
    prompts: PromptEncoder
    path: Path
    random_weights: bool = False


def load_base(path: str | os.PathLike = "", *, dtype: Any = jnp.float32, param_dtype: Any = None,
              attention: str = "auto", remat: bool = False, tiny_seed: int = 0) -> Base:
    """Load an SD folder (diffusers layout, or jsr-native components) as a :class:`Base`.

    Args:
      path: the folder with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``; ``""`` = the embedded tiny
        random model (written under ``$JSR_CACHE`` or ``~/.cache/jsr`` on first use).
      dtype: compute dtype of the UNet and VAE (bf16 on accelerators).
      param_dtype: storage dtype of the frozen parameters (default: ``dtype``).
      attention: ``jsr.models.attention`` implementation.
      remat: gradient checkpointing in the UNet and VAE blocks (training).
      tiny_seed: seed of the embedded tiny model when ``path`` is empty.
    """
    from jsr.console import notice
    from jsr.weights import load_text_encoder, load_unet, load_vae
    from jsr.weights.tiny import default_tiny_sd_dir, write_tiny_sd

    if not str(path):
        folder = default_tiny_sd_dir().with_name(f"tiny-sd-{tiny_seed}")
        if not (folder / "model_index.json").is_file():
            notice(f"writing the embedded tiny random model to {folder} (first run only)...")
        folder = write_tiny_sd(folder, seed=tiny_seed)
    else:
        folder = Path(path)
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: not an SD model folder, missing {', '.join(missing)}/ "
                                    "(want the diffusers layout of e.g. stabilityai/stable-diffusion-2-1-base)")
    param_dtype = param_dtype or dtype
    unet, unet_params = load_unet(folder / "unet", dtype=param_dtype, attention_impl=attention, remat=remat)
    vae, vae_params = load_vae(folder / "vae", dtype=param_dtype, attention_impl=attention, remat=remat)
    unet, vae = unet.clone(dtype=dtype), vae.clone(dtype=dtype)
    from jsr.models.clip_text import Tokenizer

    text, text_params = load_text_encoder(folder / "text_encoder", dtype=param_dtype, attention_impl=attention)
    prompts = PromptEncoder(text.clone(dtype=dtype), text_params, Tokenizer(folder / "tokenizer"))
    models = SDModels(unet=unet, vae=vae, schedule=load_schedule(folder),
                      scaling_factor=float(vae.config.scaling_factor))
    return Base(models=models, unet_params=unet_params, vae_params=vae_params, prompts=prompts, path=folder,
                random_weights=_written_by_jsr(folder))


def _written_by_jsr(folder: Path) -> bool:
    import json

    index = folder / "model_index.json"
    return index.is_file() and "_jsr_preset" in json.loads(index.read_text())
