"""OSEDiff (Wu et al. 2024): one-step SR by VSD in latent space. ``configs/osediff.py`` or ``:tiny``."""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config("osediff")
    c.total_steps = 100_000  # OSEDiff trains with batch 16 (4 GPUs x 4), lr 5e-5, AdamW
    c.optim.lr = 5e-5
    if arg == "tiny":
        base.tiny(c)
    elif arg:
        raise ValueError(f"configs/osediff.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
