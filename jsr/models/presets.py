"""Model configurations jsr knows by name, in the diffusers/transformers ``config.json`` form.

``sd21-base``: the architecture of ``stabilityai/stable-diffusion-2-1-base`` (UNet 865.9M parameters,
VAE 83.7M, OpenCLIP-H text tower 23 x 1024 as a HF ``CLIPTextModel``), for random-weight benchmarks and
size checks. Real weights always come from a local folder (``jsr.weights``).
``tiny``: the same SD-2 family shrunk to run in seconds on a laptop CPU (tests, ``:tiny`` configs, demos).
"""

from __future__ import annotations

import copy

SD21_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

SD21_BASE_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD21_BASE_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}

SD21_BASE_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNET = dict(
    SD21_BASE_UNET,
    attention_head_dim=[2, 4],
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)

TINY_VAE = dict(
    SD21_BASE_VAE,
    block_out_channels=[16, 32, 32, 32],
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

TINY_TEXT_ENCODER = dict(
    SD21_BASE_TEXT_ENCODER,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    vocab_size=1000,
)

PRESETS = {
    "sd21-base": {"unet": SD21_BASE_UNET, "vae": SD21_BASE_VAE, "text_encoder": SD21_BASE_TEXT_ENCODER,
                  "scheduler": SD21_BASE_SCHEDULER},
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT_ENCODER,
             "scheduler": SD21_BASE_SCHEDULER},
}


def preset(name: str) -> dict[str, dict]:
    """Deep copies of the named preset's component configs (``unet``, ``vae``, ``text_encoder``, ``scheduler``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
