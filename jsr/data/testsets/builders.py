"""TFDS builders of the papers' test sets (manual download): ``realsr``, ``drealsr``, ``div2k_val``.

Importing this module registers them with ``tensorflow_datasets`` (it imports it; :mod:`jsr.data.testsets` does
so only when asked). Each builder has one split, ``test``, of examples ``{"lq": uint8 [128, 128, 3], "hq": uint8
[512, 512, 3], "name": str}`` (PNG inside), made from the set's own download in its own layout
(:mod:`jsr.data.testsets.layout`) by the protocol of :mod:`jsr.data.testsets.protocol`: the aligned centre
crops of RealSR/DRealSR pairs, and DIV2K-val 512 crops degraded with seed 0 (Real-ESRGAN preset), exactly the
arrays that the folder form ``DIV2K-Val:hq=DIV2K_valid_HR,crop=512,seed=0`` of :mod:`jsr.eval.datasets` gives.

Building needs no TensorFlow: images go in as encoded PNG bytes (TFDS encodes arrays with TensorFlow) and come
out through ``tfds.data_source`` decoded by OpenCV. Files are 8-bit; a 16-bit source image is rounded to 8 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jsr.data.images import decode_image, read_image, to_uint8
from jsr.data.testsets import layout, protocol

DIV2K_SEED = 0  # DESIGN.md: DIV2K-val 512 crops with a fixed degradation seed
DIV2K_DEGRADATION = "realesrgan"


def _png(img: np.ndarray) -> bytes:
    """[H, W, 3] RGB (uint8, or float in [0, 1]; uint16 rounded to 8 bits) -> PNG bytes."""
    if img.dtype == np.uint16:
        img = np.rint(img.astype(np.float32) / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = to_uint8(img)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {img.shape} image as PNG")
    return buf.tobytes()


class _TestSet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The shared part: features, the ``test`` split, the manual folder, the count check."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: the papers' 128 -> 512 protocol."}
    LABEL = ""  # the name in the evaluation tables
    EXPECTED = 0  # images in the papers' set: a manual folder holding another count is reported, not refused
    DESCRIPTION = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ""
    find: Callable[[Path], list[layout.PairFiles]]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, supervised_keys=("lq", "hq"),
            metadata=tfds.core.MetadataDict(label=self.LABEL, scale=protocol.SCALE),
            features=tfds.features.FeaturesDict({
                "lq": tfds.features.Image(shape=(protocol.LQ_CROP, protocol.LQ_CROP, 3), encoding_format="png"),
                "hq": tfds.features.Image(shape=(protocol.HQ_CROP, protocol.HQ_CROP, 3), encoding_format="png"),
                "name": tfds.features.Text()}))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        files = type(self).find(Path(dl_manager.manual_dir))
        if len(files) != self.EXPECTED:
            logging.warning("%s: %d images in %s, the papers' set has %d", self.LABEL, len(files),
                            dl_manager.manual_dir, self.EXPECTED)
        return {"test": self._generate_examples(files)}

    def _generate_examples(self, files: list[layout.PairFiles]) -> Iterator[tuple[str, dict]]:
        for f in files:
            lq, hq = self._example(f)
            yield f.name, {"lq": _png(lq), "hq": _png(hq), "name": f.name}

    def _example(self, f: layout.PairFiles) -> tuple[np.ndarray, np.ndarray]:
        """The cropped ``(lq, hq)`` arrays of one test image."""
        raise NotImplementedError


class _PairedTestSet(_TestSet, skip_registration=True):
    def _example(self, f: layout.PairFiles) -> tuple[np.ndarray, np.ndarray]:
        lq = decode_image(Path(f.lq).read_bytes(), f.lq)
        hq = decode_image(Path(f.hq).read_bytes(), f.hq)
        return protocol.crop_pair(lq, hq, protocol.HQ_CROP, protocol.SCALE, what=f"{self.LABEL} {f.name}")


class Realsr(_PairedTestSet):
    """RealSR (V3) x4 test set, Canon and Nikon: 100 pairs, LQ 128 / HQ 512 centre crops."""

    name = "realsr"
    LABEL, EXPECTED = "RealSR", 100
    find = staticmethod(layout.realsr_pairs)
    DESCRIPTION = ("RealSR (V3) x4 test pairs (Canon and Nikon, 50 + 50), aligned centre crops: LQ 128 x 128, "
                   "HQ 512 x 512 (StableSR's protocol, as OSEDiff, PiSA-SR and CTSR evaluate).")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download RealSR (V3) (csjcai/RealSR on GitHub links it) and unpack it; pass the "
                                    "folder holding Canon/ and Nikon/ (Canon/Test/4/Canon_001_HR.png, "
                                    "Canon_001_LR4.png, ...) as the manual folder.")


class Drealsr(_PairedTestSet):
    """DRealSR x4 test set: 93 pairs, LQ 128 / HQ 512 centre crops."""

    name = "drealsr"
    LABEL, EXPECTED = "DRealSR", 93
    find = staticmethod(layout.drealsr_pairs)
    DESCRIPTION = ("DRealSR x4 test pairs (93), aligned centre crops: LQ 128 x 128, HQ 512 x 512 (StableSR's "
                   "protocol, as OSEDiff, PiSA-SR and CTSR evaluate).")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download DRealSR (the repository "
                                    "xiezw5/Component-Divide-and-Conquer-for-Real-World-Image-Super-Resolution links "
                                    "it) and unpack it; pass a folder holding x4/Test_x4/test_HR/*_x4.png and "
                                    "test_LR/*_x1.png (at any depth) as the manual folder.")


class Div2kVal(_TestSet):
    """DIV2K validation HQ images, 512 centre crops, degraded with the Real-ESRGAN preset and seed 0: 100 pairs."""

    name = "div2k_val"
    LABEL, EXPECTED = "DIV2K-Val", 100
    find = staticmethod(layout.div2k_val_images)
    DESCRIPTION = ("DIV2K validation images (100): 512 x 512 centre crops degraded by the Real-ESRGAN second-order "
                   f"pipeline (jsr.data.degradation, preset {DIV2K_DEGRADATION!r}) with seed {DIV2K_SEED}, each "
                   "image from its own generator seeded by (seed, crc32(name)).")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download DIV2K's validation HR images (DIV2K_valid_HR.zip from the DIV2K site) "
                                    "and unpack them; pass the folder holding DIV2K_valid_HR/ (0801.png ... "
                                    "0900.png) as the manual folder.")

    def _example(self, f: layout.PairFiles) -> tuple[np.ndarray, np.ndarray]:
        return protocol.degraded_pair(read_image(f.hq), f.name, seed=DIV2K_SEED, crop=protocol.HQ_CROP,
                                      scale=protocol.SCALE, degradation=DIV2K_DEGRADATION)


BUILDERS: dict[str, type[_TestSet]] = {b.name: b for b in (Realsr, Drealsr, Div2kVal)}
