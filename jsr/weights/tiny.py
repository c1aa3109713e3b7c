"""The embedded default model: a complete, tiny, randomly initialised SD-2-family folder.

No pretrained weights exist offline, yet every entry point (training, inference, evaluation, the README's first
command) should run end to end through the *real* loading code. :func:`write_tiny_sd` writes a diffusers-layout
folder — ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json`` — with the
``tiny`` preset's architectures (``jsr.models.presets``) and seeded random weights, which the PyTorch libraries
load too (``StableDiffusionPipeline.from_pretrained``). The tokenizer is a genuine CLIP BPE tokenizer with the
byte-level base vocabulary only (no merges): every word splits into characters, which is all a random text
encoder needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jsr.console import cache_root
from jsr.models.common import random_params
from jsr.models.presets import preset

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_vocab() -> dict[str, int]:
    # CLIP's byte -> printable-unicode table (GPT-2's): printable Latin-1 bytes map to themselves, the rest to
    # U+0100 upwards, so that every byte string is a string of visible characters.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: str | os.PathLike, max_length: int = 77) -> Path:
    """Write a byte-level CLIP BPE tokenizer (``vocab.json``, ``merges.txt``, configs) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
        "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def write_tiny_sd(folder: str | os.PathLike, seed: int = 0, preset_name: str = "tiny") -> Path:
    """Write a complete SD folder with random weights of the ``preset_name`` architectures; returns ``folder``.

    Deterministic in ``seed``. An existing complete folder is left as it is (so repeated runs share it).
    """
    from jsr.weights.clip_text import save_text_encoder, text_encoder_from_config
    from jsr.weights.unet import save_unet, unet_from_config
    from jsr.weights.vae import save_vae, vae_from_config

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    cfg = preset(preset_name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    unet = unet_from_config(cfg["unet"])
    save_unet(unet, random_params(unet, seed), tmp / "unet")
    vae = vae_from_config(cfg["vae"])
    save_vae(vae, random_params(vae, seed + 10), tmp / "vae")
    text = text_encoder_from_config(cfg["text_encoder"])
    save_text_encoder(text, random_params(text, seed + 20), tmp / "text_encoder")
    write_tokenizer(tmp / "tokenizer", cfg["text_encoder"]["max_position_embeddings"])
    (tmp / "scheduler").mkdir(parents=True, exist_ok=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_jsr_preset": preset_name, "_jsr_seed": seed,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    _publish(tmp, folder, "model_index.json")
    return folder


def _publish(tmp: Path, folder: Path, marker: str) -> None:
    """Move the finished ``tmp`` folder to ``folder`` atomically: a crash never leaves a half folder in place. When
    a concurrent writer (another process of a multi-process run, another test worker) got there first, its copy
    is kept and ours deleted; the same seed wrote the same bytes."""
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / marker).is_file():
            raise


# A CLIP ViT in miniature (RCOD's visual-prompt encoder on the tiny base): a 4 x 4 patch grid (17 tokens), width 48
# (not the tiny UNet's cross-attention width 32, so the projection to it is a real map), OpenAI CLIP's quick_gelu.
TINY_CLIP_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, num_channels=3)


def write_tiny_clip_vision(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a transformers ``CLIPVisionModel`` folder (``config.json`` + ``model.safetensors``) with seeded random
    weights of :data:`TINY_CLIP_VISION`; returns ``folder``. An existing folder is left as it is; written
    atomically (concurrent test workers share it)."""
    from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
    from jsr.weights.clip_vision import WEIGHTS_NAME, save_clip_vision

    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return folder
    cfg = dict(TINY_CLIP_VISION, model_type="clip_vision_model", architectures=["CLIPVisionModel"])
    module = CLIPVisionModel(CLIPVisionConfig.from_transformers(cfg))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_clip_vision(module, random_params(module, seed + 30), tmp)
    _publish(tmp, folder, WEIGHTS_NAME)
    return folder


def default_tiny_clip_vision_dir(seed: int = 0) -> Path:
    """Where the tiny CLIP vision stand-in lives: beside the tiny SD model, ``tiny-clip-vision-<seed>``."""
    return default_tiny_sd_dir().with_name(f"tiny-clip-vision-{seed}")


def default_tiny_sd_dir() -> Path:
    """Where the embedded default lives: ``$JSR_CACHE`` or ``~/.cache/jsr``, ``/tiny-sd``."""
    return cache_root() / "tiny-sd"

