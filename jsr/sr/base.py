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
from typing import Any, Sequence

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
      prompts: prompt -> embedding encoder with a per-prompt cache; the text encoder loads on the first prompt
        (:class:`LazyPromptEncoder`), so a method whose context comes from the image (RCOD) needs no
        ``text_encoder/`` or ``tokenizer/`` to restore.
      path: the folder it came from.
      random_weights: the folder holds random weights written by ``jsr.weights.tiny.write_tiny_sd`` (its
        ``model_index.json`` names a ``_jsr_preset``): training may then stand in random teachers and a random
        LPIPS trunk for missing files, since no result of such a run means anything anyway.
    """

    models: SDModels
    unet_params: Any
    vae_params: Any
    prompts: "PromptEncoder | LazyPromptEncoder"
    path: Path
    random_weights: bool = False


class LazyPromptEncoder:
    """A :class:`jsr.sr.prompts.PromptEncoder` for an SD folder's ``text_encoder/`` and ``tokenizer/``, loaded on
    the first prompt (``__call__``, ``negative``, ``len``). A missing folder is a FileNotFoundError then, naming it."""

    def __init__(self, folder: Path, dtype: Any, param_dtype: Any, attention: str):
        self.folder, self._args, self._encoder = Path(folder), (dtype, param_dtype, attention), None

    @property
    def loaded(self) -> bool:
        """Whether the text encoder has been loaded."""
        return self._encoder is not None

    @property
    def encoder(self) -> PromptEncoder:
        """The loaded encoder (loading it now if needed)."""
        if self._encoder is None:
            from jsr.models.clip_text import Tokenizer
            from jsr.weights import load_text_encoder

            missing = [d for d in ("text_encoder", "tokenizer") if not (self.folder / d).is_dir()]
            if missing:
                raise FileNotFoundError(f"{self.folder}: no {' or '.join(d + '/' for d in missing)} (this method "
                                        "encodes a text prompt: want the diffusers layout of the SD model)")
            dtype, param_dtype, attention = self._args
            text, params = load_text_encoder(self.folder / "text_encoder", dtype=param_dtype,
                                             attention_impl=attention)
            self._encoder = PromptEncoder(text.clone(dtype=dtype), params, Tokenizer(self.folder / "tokenizer"))
        return self._encoder

    def __call__(self, prompts: str | Sequence[str]) -> Any:
        return self.encoder(prompts)

    def negative(self, *args: Any, **kw: Any) -> Any:
        return self.encoder.negative(*args, **kw)

    def __len__(self) -> int:
        return 0 if self._encoder is None else len(self._encoder)


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
    from jsr.weights import load_unet, load_vae
    from jsr.weights.tiny import default_tiny_sd_dir, write_tiny_sd

    if not str(path):
        folder = default_tiny_sd_dir().with_name(f"tiny-sd-{tiny_seed}")
        if not (folder / "model_index.json").is_file():
            notice(f"writing the embedded tiny random model to {folder} (first run only)...")
        folder = write_tiny_sd(folder, seed=tiny_seed)
    else:
        folder = Path(path)
        # The text encoder and tokenizer load on the first prompt (LazyPromptEncoder): not needed by every method.
        missing = [d for d in ("unet", "vae", "scheduler") if not (folder / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: not an SD model folder, missing {', '.join(missing)}/ "
                                    "(want the diffusers layout of e.g. stabilityai/stable-diffusion-2-1-base)")
    param_dtype = param_dtype or dtype
    unet, unet_params = load_unet(folder / "unet", dtype=param_dtype, attention_impl=attention, remat=remat)
    vae, vae_params = load_vae(folder / "vae", dtype=param_dtype, attention_impl=attention, remat=remat)
    unet, vae = unet.clone(dtype=dtype), vae.clone(dtype=dtype)
    prompts = LazyPromptEncoder(folder, dtype, param_dtype, attention)
    models = SDModels(unet=unet, vae=vae, schedule=load_schedule(folder),
                      scaling_factor=float(vae.config.scaling_factor))
    return Base(models=models, unet_params=unet_params, vae_params=vae_params, prompts=prompts, path=folder,
                random_weights=_written_by_jsr(folder))


def _written_by_jsr(folder: Path) -> bool:
    import json

    index = folder / "model_index.json"
    return index.is_file() and "_jsr_preset" in json.loads(index.read_text())
