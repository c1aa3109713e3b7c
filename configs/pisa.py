"""Old name of ``configs/pisasr.py`` (the method is ``pisasr`` everywhere now); kept so old commands run."""

from configs.pisasr import get_config  # noqa: F401
