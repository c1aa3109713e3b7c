"""RCOD (RCOD-O, the OSEDiff-based variant): OSEDiff's generator with latent grouping (the UNet timestep is a
realism code picked per sample), degradation-aware VSD timesteps and CLIP visual prompts. ``configs/rcod.py`` or
``:tiny`` (the tiny random base with a tiny random CLIP vision stand-in).

Release run (``RCOD_O/scripts/train/train_rcod_o.sh``): lr 5e-5 constant (AdamW, clip 1.0), batch 2 on each of 4
GPUs, 100,000 steps (``max_train_steps`` default), L2 1 / LPIPS 2 / VSD 1 (CFG 7.5), LoRA rank 4, 3 groups,
OSEDiff's negative prompt. Set ``--config.rcod.vision=/models/clip-vit-large-patch14`` (a transformers folder).
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config("rcod")
    c.total_steps = 100_000
    c.data.batch_size = 8
    c.optim.lr = 5e-5
    c.loss.l2, c.loss.lpips, c.loss.vsd = 1.0, 2.0, 1.0
    c.loss.cfg_scale, c.loss.vsd_t_min, c.loss.vsd_t_max = 7.5, 20, 980
    if arg == "tiny":
        base.tiny(c)
        c.rcod.vision = ""  # the tiny random CLIP vision stand-in beside the tiny base
    elif arg:
        raise ValueError(f"configs/rcod.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
