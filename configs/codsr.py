"""CODSR: stage 1 (SFT + region-adaptive activation + UNet/VAE LoRAs, GAN from step 3,000), stage 2 (text-matching
LoRA on attn2 with noun masks + VSD). ``configs/codsr.py:stage1``, ``:stage2``, ``:stage1-tiny``, ``:stage2-tiny``.

Release runs (``train_stage1.sh``, ``train_stage2_offline.sh``): lr 5e-5, AdamW, clip 1.0; stage 1 batch 4,
14,000 steps, UNet LoRA rank 16, VAE LoRA rank 4, L2 1 / LPIPS 2 / GAN 0.2 from step 3,000; stage 2 batch 1 x 4
accumulated, 4,000 steps, L2 1 / LPIPS 2 / VSD 2 (CFG 7.5, t in [20, 980)) / area 0.5 / pixel BCE 0.025, captions
(and their masks) dropped for 20 % of the images.

Stage 1 needs ``--config.codsr.disc_backbone=<transformers DINO ViT or CLIP vision folder>`` for its GAN (or
``--config.codsr.gan_weight=0``); stage 2 needs ``--config.codsr.stage1=<stage-1 workdir>/export/gen`` (or CODSR's
stage-1 release file) and image folders with noun masks (``--config.data.source=folder --config.data.path=...``;
the layout is in the README).
"""

from configs import base


def get_config(arg: str | None = None):
    stage, tiny = base.two_stage_arg(arg, "configs/codsr.py")
    c = base.get_config("codsr")
    c.optim.lr = 5e-5
    c.loss.l2, c.loss.lpips = 1.0, 2.0
    c.codsr.stage = stage
    if stage == 1:
        c.total_steps = 14_000
        c.data.batch_size = 4
    else:
        c.total_steps = 4_000
        c.data.batch_size = 4
        c.data.null_prompt_ratio = 0.2
        c.data.noun_masks = True
        c.loss.vsd, c.loss.vsd_t_min, c.loss.vsd_t_max, c.loss.cfg_scale = 2.0, 20, 980, 7.5
    if tiny:
        base.tiny(c)
        c.codsr.gan_start = 2  # both phases (reconstruction only, then + GAN) within the tiny run's 6 steps
        c.codsr.disc_hidden = 16
        c.codsr.lora_rank, c.codsr.align_rank = 4, 4
    return c
