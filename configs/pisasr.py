"""PiSA-SR (Sun et al. 2025): pixel LoRA (l2) then semantic LoRA (l2 + LPIPS + CSD), residual at t = 1.
``configs/pisasr.py`` or ``:tiny``."""

from configs import base
from jsr.data import degradation_config


def get_config(arg: str | None = None):
    c = base.get_config("pisasr")
    c.total_steps = 8_000
    c.pisasr.pixel_steps = 4_000
    c.data.degradation = degradation_config("pisa")
    if arg == "tiny":
        base.tiny(c)
    elif arg:
        raise ValueError(f"configs/pisasr.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
