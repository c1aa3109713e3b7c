"""FiDeSR: PiSA-SR's residual generator (t = 1) with a rank-8 UNet LoRA + the LRRB, trained on DAW-weighted
L2 + 2 LPIPS + CSD. ``configs/fidesr.py`` or ``:tiny``.

Release run (``scripts/train/train_fidesr.sh``): lr 5e-5, batch 4 on each of 2 GPUs, 200,500 steps, L2 1 / LPIPS 2 /
CSD 1 (CFG 7.5, t in [20, 500)), null-prompt ratio 0.5, DAW 0.6 after 2,000 + 1,000 steps; PiSA-SR's data
pipeline (its degradation preset).
"""

from configs import base
from jsr.data import degradation_config


def get_config(arg: str | None = None):
    c = base.get_config("fidesr")
    c.total_steps = 200_500
    c.data.batch_size = 8
    c.data.null_prompt_ratio = 0.5
    c.data.degradation = degradation_config("pisa")
    c.optim.lr = 5e-5
    c.loss.l2, c.loss.lpips, c.loss.csd = 1.0, 2.0, 1.0
    c.loss.cfg_scale, c.loss.csd_t_min, c.loss.csd_t_max = 7.5, 20, 500
    if arg == "tiny":
        base.tiny(c)
        c.fidesr.daw_warmup, c.fidesr.daw_ramp = 2, 2  # DAW ramps in within the tiny run's 6 steps
    elif arg:
        raise ValueError(f"configs/fidesr.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
