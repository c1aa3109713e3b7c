"""The pixel normalisation a transformers vision folder expects, from its ``preprocessor_config.json``.

An image processor maps 8-bit pixels ``p`` to ``(p * rescale_factor - image_mean) / image_std`` (each step only
when its ``do_rescale`` / ``do_normalize`` flag is on). jsr feeds [0, 1] pixels ``x = p / 255``, so the same map
is ``(x - mean) / std`` with ``mean = image_mean / (255 rescale_factor)`` and ``std = image_std / (255
rescale_factor)`` (``rescale_factor`` 1/255, the usual value, gives the file's statistics unchanged). Resizing and
cropping are the caller's (the discriminator resizes its own square crops).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from jsr.weights import io

PREPROCESSOR_NAME = "preprocessor_config.json"

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _channels(value: Any, key: str, path: Path, n: int) -> tuple[float, ...]:
    """A per-channel statistic: a number (every channel) or a list of ``n`` numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * n
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    raise io.CorruptFileError(f"{path}: {key}={value!r} is not a number or a list of {n} numbers")


def read_normalization(folder: str | os.PathLike, default: Stats, channels: int = 3) -> tuple[Stats, str]:
    """``((mean, std), source)`` for [0, 1] pixels: from ``folder/preprocessor_config.json`` when it exists,
    else ``default`` (the model family's statistics). ``source`` says which, for logs.

    Raises:
      CorruptFileError (one line naming the file) for a file that is not a JSON object or whose statistics are
      not numbers, or has a non-positive std or rescale factor.
    """
    path = Path(folder) / PREPROCESSOR_NAME
    if not path.is_file():
        return default, "the model family's default (no preprocessor_config.json)"
    cfg = io.read_json(path, "image processor config")
    if not isinstance(cfg, dict):
        raise io.CorruptFileError(f"{path}: not an image processor config (a JSON {type(cfg).__name__})")
    if cfg.get("do_rescale", True):
        factor = cfg.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise io.CorruptFileError(f"{path}: rescale_factor={factor!r} is not a positive number")
        scale = 255.0 * float(factor)
    else:  # the model reads raw 0..255 values
        scale = 255.0
    if cfg.get("do_normalize", True):
        mean = _channels(cfg.get("image_mean", default[0]), "image_mean", path, channels)
        std = _channels(cfg.get("image_std", default[1]), "image_std", path, channels)
        if min(std) <= 0:
            raise io.CorruptFileError(f"{path}: image_std={list(std)} must be positive")
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return (tuple(m / scale for m in mean), tuple(s / scale for s in std)), str(path)
