"""The papers' test-set protocol as plain NumPy (no TensorFlow): the crops and the seeded degradation that both
forms of a test set use, the image folders of :mod:`jsr.eval.datasets` and the TFDS builders of
:mod:`jsr.data.testsets.builders`, so that both give the same arrays for the same files.

StableSR's protocol, which OSEDiff, PiSA-SR and CTSR follow: the x4 pairs of RealSR and DRealSR are centre-cropped
to LQ 128 x 128 and HQ 512 x 512; DIV2K-val HQ images are cropped to 512 x 512 and degraded with the Real-ESRGAN
pipeline. Here the two crops of a pair are *aligned*: the LQ crop sits at the LQ image's centre and the HQ crop at
``scale`` times that offset, which is the HQ image's centre whenever the HQ is exactly ``scale`` times the LQ
(cropping each image at its own centre would shift the HQ by up to ``scale / 2`` pixels when a side's margin
is odd). A degraded image draws every random number from its own generator, seeded by ``(seed, crc32(name))``:
the same LQ on every run and machine, whatever other files the folder holds.

Images are [H, W, 3] arrays in any dtype (crops do not convert); :func:`degraded_pair` takes float32 in [0, 1].
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import numpy as np

from jsr.data import degradation as degradation_lib

SCALE = 4  # the papers' x4 protocol: LQ 128 -> SR 512
HQ_CROP = 512
LQ_CROP = HQ_CROP // SCALE


class Box(NamedTuple):
    """A square crop: top-left corner and side, in pixels."""

    top: int
    left: int
    size: int

    def cut(self, img: np.ndarray) -> np.ndarray:
        """``img[top:top + size, left:left + size]`` (contiguous)."""
        return np.ascontiguousarray(img[self.top:self.top + self.size, self.left:self.left + self.size])


def paired_crop_boxes(lq_hw: tuple[int, int], hq_hw: tuple[int, int], crop: int = HQ_CROP, scale: int = SCALE,
                      what: str = "pair") -> tuple[Box, Box]:
    """The aligned centre crops of an LQ/HQ pair: ``(lq_box, hq_box)``, the HQ box ``crop`` pixels wide and the LQ
    box ``crop / scale``, the HQ box at ``scale`` times the LQ box's offset.

    Args:
      lq_hw, hq_hw: ``(height, width)`` of the LQ and HQ images.
      crop: the HQ crop side (512), a multiple of ``scale``.
      scale: HQ size / LQ size (4).
      what: the pair's name in error messages.
    Raises:
      ValueError: ``crop`` not a positive multiple of ``scale``, or a crop that does not fit in its image.
    """
    if crop <= 0 or crop % scale:
        raise ValueError(f"{what}: crop {crop} must be a positive multiple of the scale {scale}")
    c = crop // scale
    (h, w), (hh, hw) = lq_hw, hq_hw
    if h < c or w < c:
        raise ValueError(f"{what}: LQ is {w}x{h}, smaller than the {c}x{c} crop")
    top, left = (h - c) // 2, (w - c) // 2
    if scale * top + crop > hh or scale * left + crop > hw:
        raise ValueError(f"{what}: HQ is {hw}x{hh}, too small for the {crop}x{crop} crop aligned with the LQ "
                         f"({w}x{h}) crop at ({left}, {top}); is it x{scale} the LQ?")
    return Box(top, left, c), Box(scale * top, scale * left, crop)


def crop_pair(lq: np.ndarray, hq: np.ndarray, crop: int = HQ_CROP, scale: int = SCALE,
              what: str = "pair") -> tuple[np.ndarray, np.ndarray]:
    """``(lq [crop/scale, crop/scale, 3], hq [crop, crop, 3])``: the aligned centre crops of
    :func:`paired_crop_boxes`, dtypes kept."""
    lq_box, hq_box = paired_crop_boxes(lq.shape[:2], hq.shape[:2], crop, scale, what)
    return lq_box.cut(lq), hq_box.cut(hq)


def center_crop(hq: np.ndarray, crop: int, scale: int = SCALE, what: str = "image") -> np.ndarray:
    """An HQ image to be degraded: its centre ``crop x crop`` (0: the whole image), then cut at the bottom/right to
    a multiple of ``scale`` (the degradation needs it). Raises ValueError for an image smaller than either."""
    h, w = hq.shape[:2]
    if crop:
        if h < crop or w < crop:
            raise ValueError(f"{what} is {w}x{h}, smaller than crop={crop}")
        hq = hq[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]
        h = w = crop
    if h < scale or w < scale:
        raise ValueError(f"{what} is {w}x{h}, smaller than the scale {scale}")
    return np.ascontiguousarray(hq[:h - h % scale, :w - w % scale])


def degradation_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of test image ``name``: seeded by ``(seed, crc32(name))``, so one image's LQ does not depend
    on which other images the set holds or in which order they are read."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def degraded_pair(hq: np.ndarray, name: str, *, seed: int = 0, crop: int = HQ_CROP, scale: int = SCALE,
                  degradation: Any = "realesrgan", what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(lq, hq)`` of an HQ-only test image: :func:`center_crop`, then :func:`jsr.data.degradation.degrade` with
    :func:`degradation_rng`.

    Args:
      hq: [H, W, 3] float32 RGB in [0, 1].
      name: the image's key (its relative file stem), which seeds it.
      seed: the set's degradation seed.
      crop: HQ centre crop side (0: the whole image).
      scale: the degradation's scale; must be the preset's.
      degradation: a preset name (``realesrgan``, ``pisa``) or a :class:`jsr.data.degradation.DegradationConfig`.
      what: the image in error messages (default: ``name``).
    Returns:
      ``lq`` [h/scale, w/scale, 3] (8-bit valued) and the cropped ``hq`` [h, w, 3], float32 in [0, 1].
    """
    cfg = degradation_lib.resolve_config(degradation)
    if cfg.scale != scale:
        raise ValueError(f"{what or name}: the degradation has scale {cfg.scale}, not {scale}")
    hq = center_crop(hq, crop, scale, what=what or name)
    return degradation_lib.degrade(hq, degradation_rng(seed, name), cfg)["lq_small"], hq
