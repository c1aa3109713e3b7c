"""Checkpoints in and out: diffusers/transformers/peft folders and files <-> jsr Flax parameter trees.

    from jsr.weights import load_unet, load_vae, load_text_encoder
    unet, unet_params = load_unet("stable-diffusion-2-1-base/unet", dtype=jnp.bfloat16)

Every ``load_*`` returns ``(module, params)`` and reads diffusers/transformers folders (safetensors, or ``.bin``
with torch) as well as jsr-native folders (``python -m jsr.weights to-jsr``). Every ``save_*`` writes a folder
that the PyTorch libraries load with ``from_pretrained``. ``python -m jsr.weights --help`` converts whole SD folders.
"""

import importlib

_EXPORTS = {
    "load_unet": "jsr.weights.unet", "save_unet": "jsr.weights.unet",
    "load_vae": "jsr.weights.vae", "save_vae": "jsr.weights.vae",
    "load_text_encoder": "jsr.weights.clip_text", "save_text_encoder": "jsr.weights.clip_text",
    "load_clip_vision": "jsr.weights.clip_vision", "save_clip_vision": "jsr.weights.clip_vision",
    "load_vit": "jsr.weights.vit", "save_vit": "jsr.weights.vit",
    "load_peft_lora": "jsr.weights.peft", "save_peft_lora": "jsr.weights.peft",
    "CheckpointMismatchError": "jsr.weights.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that importing jsr.weights.io does not pull in every model definition.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jsr.weights' has no attribute {name!r}")
