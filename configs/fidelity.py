"""A fidelity teacher for CTSR: the OSEDiff generator form trained on the reconstruction loss only
(no VSD), so it stays close to the ground truth. ``configs/fidelity.py`` or ``:tiny``."""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config("fidelity")
    c.total_steps = 20_000
    c.loss.vsd = 0.0
    c.loss.lpips = 1.0  # L2-heavy: fidelity over perceptual sharpness
    if arg == "tiny":
        base.tiny(c)
    elif arg:
        raise ValueError(f"configs/fidelity.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
