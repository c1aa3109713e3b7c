"""PiSA-SR (Sun et al. 2025): pixel LoRA (l2) then semantic LoRA (l2 + LPIPS + CSD), residual at t = 1.
``configs/pisa.py`` or ``:tiny``."""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.method = "pisa"
    c.total_steps = 8_000
    c.pisa.pixel_steps = 4_000
    c.data.degradation = __import__("jsr.data", fromlist=["degradation_config"]).degradation_config("pisa")
    if arg == "tiny":
        base.tiny(c)
    elif arg:
        raise ValueError(f"configs/pisa.py: unknown variant {arg!r} (want '' or 'tiny')")
    return c
