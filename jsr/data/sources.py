"""Image sources: random-access sequences of light records, decoded later by ``load_record``.

A source has ``__len__`` and ``__getitem__(i) -> dict`` and never raises for one bad item: reading and
decoding happen in ``load_record`` (called inside the pipeline, where a failure is skipped, counted and logged).
A record holds ``name`` (for logs) and one of

    ``path``   an image file to read and decode,
    ``image``  an already decoded HxWxC array or the encoded bytes of one,
    ``error``  why the item could not even be fetched (TFDS read errors),

plus ``prompt`` (a string) or ``prompt_path`` (a sidecar text file; its contents win when it exists).

Sources: ``FolderSource`` (recursive image folder), ``PairedFolderSource`` (LQ/HQ pairs for evaluation, already
decoded), ``TfdsSource`` (``tfds.data_source`` over ArrayRecord; tensorflow_datasets is optional) and
``SyntheticSource`` (seeded procedural images; the default when no data is configured, and the tests' source).
Images come out HxWx3 RGB: 8-/16-bit and float files, grayscale (replicated) and RGBA (alpha dropped), EXIF
orientation applied; files are decoded by :mod:`jsr.data.images` (re-exported here: ``IMAGE_EXTENSIONS``,
``decode_image``, ``to_float01``, ``list_images``, and ``load_image`` = ``read_image``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from jsr.data.images import IMAGE_EXTENSIONS, decode_image, list_images, read_image, to_float01  # noqa: F401

PROMPT_MODES = ("empty", "fixed", "sidecar")


# --------------------------------------------------------------------------------------------- decoding
# Files are decoded by jsr.data.images (one reader for training, inference and metrics); load_image is its
# read_image under this module's former name.

load_image = read_image


def _native_rgb(image: Any, name: str) -> np.ndarray:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, name)
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind in "SU":  # a TFDS string scalar holding encoded bytes
        return decode_image(arr.item() if arr.ndim == 0 else bytes(arr), name)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: unsupported image array shape {arr.shape}")
    # Arrays handed over by datasets (TFDS) are RGB(A) already.
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else np.ascontiguousarray(arr[..., :3])


def load_record(record: dict) -> dict:
    """Fetch a source record: ``{"image": HxWx3 RGB in its own dtype, "prompt": str, "name": str}``.

    Raises (``OSError``/``ValueError``) for an unreadable item; the pipeline catches, counts and logs it.
    """
    name = str(record.get("name", record.get("path", "?")))
    if "error" in record:
        raise ValueError(f"{name}: {record['error']}")
    if "image" in record:
        image = _native_rgb(record["image"], name)
    else:
        with open(record["path"], "rb") as f:
            image = decode_image(f.read(), name)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image {image.shape}")
    prompt = record.get("prompt", "")
    prompt_path = record.get("prompt_path", "")
    if prompt_path and os.path.exists(prompt_path):
        with open(prompt_path, encoding="utf-8") as f:
            prompt = f.read().strip()
    return {"image": image, "prompt": str(prompt), "name": name}


# --------------------------------------------------------------------------------------------- folders


def _check_prompt(mode: str, text: str) -> None:
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r}: expected one of {PROMPT_MODES}")
    if mode == "fixed" and not text:
        raise ValueError("prompt mode 'fixed' needs a non-empty prompt text")


class FolderSource:
    """All images under one or more folders (recursive), in sorted path order.

    Args:
      roots: a folder, a comma-separated list of folders, or a sequence of folders.
      prompt: ``empty`` (""), ``fixed`` (``prompt_text`` for every image) or ``sidecar`` (``name.txt`` next to
        ``name.png``; ``prompt_text`` where a sidecar is missing).
      prompt_text: the fixed prompt / the fallback.
      extensions: accepted file extensions.
    """

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike], prompt: str = "empty",
                 prompt_text: str = "", extensions: Sequence[str] = IMAGE_EXTENSIONS):
        _check_prompt(prompt, prompt_text)
        if isinstance(roots, (str, os.PathLike)):
            roots = [r for r in str(roots).split(",") if r.strip()]
        self.roots = [Path(r.strip() if isinstance(r, str) else r) for r in roots]
        if not self.roots:
            raise ValueError("FolderSource: no folder given (set data.path)")
        self.paths: list[str] = []
        for root in self.roots:
            found = list_images(root, extensions)
            if not found:
                raise FileNotFoundError(f"image folder {str(root)!r} holds no images with extensions {extensions}")
            self.paths.extend(str(p) for p in found)
        self.prompt, self.prompt_text = prompt, prompt_text

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        record = {"name": path, "path": path, "prompt": self.prompt_text if self.prompt != "empty" else ""}
        if self.prompt == "sidecar":
            record["prompt_path"] = os.path.splitext(path)[0] + ".txt"
        return record

    def __repr__(self) -> str:
        return f"FolderSource({[str(r) for r in self.roots]}, {len(self)} images, prompt={self.prompt!r})"


def _stem_key(path: Path, root: Path, strip: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    key = rel.as_posix()
    return re.sub(strip, "", key) if strip else key


class PairedFolderSource:
    """LQ/HQ image pairs for evaluation, matched by file stem (relative path without extension).

    Args:
      lq_root, hq_root: the two folders (searched recursively).
      strip: an optional regular expression removed from every stem before matching, for datasets whose names
        differ by a suffix (RealSR: ``Canon_001_LR4`` / ``Canon_001_HR`` -> ``strip=r"_(LR\\d*|HR)$"``).

    Raises ``ValueError`` listing the unmatched names on either side, and on duplicate keys.
    Items: ``{"name": key, "lq": float32 HxWx3, "hq": float32 HxWx3, "lq_path", "hq_path"}`` in [0, 1].
    """

    def __init__(self, lq_root: str | os.PathLike, hq_root: str | os.PathLike, strip: str = "",
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.lq_root, self.hq_root = Path(lq_root), Path(hq_root)
        lq = self._index(self.lq_root, strip, extensions, "LQ")
        hq = self._index(self.hq_root, strip, extensions, "HQ")
        only_lq, only_hq = sorted(set(lq) - set(hq)), sorted(set(hq) - set(lq))
        if only_lq or only_hq:
            raise ValueError(
                f"paired folders {str(self.lq_root)!r} (LQ) and {str(self.hq_root)!r} (HQ) do not match by file stem: "
                f"{len(only_lq)} LQ without HQ {_preview(only_lq)}, {len(only_hq)} HQ without LQ {_preview(only_hq)}"
                + ("" if strip else "; if the names differ by a suffix, pass strip=<regex>"))
        self.keys = sorted(lq)
        self.lq_paths = [lq[k] for k in self.keys]
        self.hq_paths = [hq[k] for k in self.keys]

    @staticmethod
    def _index(root: Path, strip: str, extensions: Sequence[str], side: str) -> dict[str, str]:
        files = list_images(root, extensions)
        if not files:
            raise FileNotFoundError(f"{side} folder {str(root)!r} holds no images")
        index: dict[str, str] = {}
        for p in files:
            key = _stem_key(p, root, strip)
            if key in index:
                raise ValueError(f"{side} folder {str(root)!r}: {index[key]!r} and {str(p)!r} both map to the "
                                 f"name {key!r}")
            index[key] = str(p)
        return index

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        return {"name": self.keys[index], "lq": load_image(self.lq_paths[index]),
                "hq": load_image(self.hq_paths[index]), "lq_path": self.lq_paths[index],
                "hq_path": self.hq_paths[index]}


def _preview(names: Iterable[str], limit: int = 10) -> list[str]:
    names = list(names)
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


# --------------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A prepared TFDS dataset read by random access (``tfds.data_source``, ArrayRecord files).

    The image feature is read undecoded (``tfds.decode.SkipDecoding``) and decoded by ``load_record``, so worker
    processes never run TensorFlow ops. tensorflow_datasets is imported only here; it is an optional dependency.
    The dataset must have been prepared in ArrayRecord format beforehand, e.g.
    ``tfds build div2k --file_format=array_record --data_dir=...``; nothing is downloaded at run time.

    Args:
      name: TFDS name, e.g. ``"div2k/bicubic_x4"``.
      split: split spec, e.g. ``"train"`` or ``"train[:90%]"``.
      data_dir: TFDS data directory (default: TFDS's own).
      image_key: the image feature (``"image"``; DIV2K's HQ is ``"hr"``).
      prompt_key: optional text feature used as the prompt; else ``prompt_text``.
      data_source: an already opened random-access source (tests; any sequence of feature dicts).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                 prompt_key: str = "", prompt_text: str = "", data_source: Sequence[dict] | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_key, self.prompt_key, self.prompt_text = image_key, prompt_key, prompt_text
        self._source = data_source if data_source is not None else self._open()
        self._length = len(self._source)
        self._injected = data_source is not None

    def _open(self) -> Sequence[dict]:
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("data.source='tfds' needs tensorflow_datasets (pip install tensorflow-datasets "
                              "array_record), and the dataset prepared in ArrayRecord format") from e
        opener = getattr(tfds, "data_source", None) or getattr(tfds, "data_sources")
        try:
            return opener(self.name, split=self.split, data_dir=self.data_dir, download=False,
                          decoders={self.image_key: tfds.decode.SkipDecoding()})
        except Exception as e:  # noqa: BLE001 - re-raised with the dataset named
            raise RuntimeError(f"could not open TFDS dataset {self.name!r} split {self.split!r} in "
                               f"{self.data_dir or 'the default data_dir'}: {e}") from e

    def __getstate__(self) -> dict:
        # The reader holds open files; workers reopen it lazily (an injected test source travels as is).
        state = dict(self.__dict__)
        if not self._injected:
            state["_source"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        name = f"tfds:{self.name}/{self.split}[{index}]"
        try:
            if self._source is None:
                self._source = self._open()
            features = self._source[index]
            record = {"name": name, "image": features[self.image_key], "prompt": self.prompt_text}
            if self.prompt_key:
                text = features[self.prompt_key]
                record["prompt"] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            return record
        except Exception as e:  # noqa: BLE001 - reported in-band so one bad record is skipped, not fatal
            return {"name": name, "error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------------- synthetic


def _value_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Multi-octave value noise (random grids, bicubic-upsampled, 1/f weights), HxWx3 in [0, 1]."""
    acc = np.zeros((h, w, 3), np.float32)
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells, cells, 3), dtype=np.float32)
        acc += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) * np.float32(0.55 ** o)
    acc -= acc.min()
    return acc / max(float(acc.max()), 1e-6)


def _region_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    center = (int(rng.integers(w)), int(rng.integers(h)))
    axes = (int(rng.integers(w // 8 + 1, w // 2 + 2)), int(rng.integers(h // 8 + 1, h // 2 + 2)))
    if rng.random() < 0.5:
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    else:
        box = ((float(center[0]), float(center[1])), (2.0 * axes[0], 2.0 * axes[1]), float(rng.uniform(0, 180)))
        cv2.fillPoly(mask, [cv2.boxPoints(box).astype(np.int32)], 255)
    return mask > 0


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def synthetic_image(seed: int, index: int, height: int = 512, width: int = 512) -> np.ndarray:
    """A deterministic procedural test image (HxWx3 uint8 RGB) for ``(seed, index)``: a value-noise texture on a
    colour gradient, sinusoidal gratings and checkerboards in random regions, and sharp-edged polygons, ellipses,
    lines and text. High- and low-frequency content, edges at every orientation: what SR needs to be exercised."""
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = int(height), int(width)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    base = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    mix = np.float32(rng.uniform(0.3, 0.8))
    img = (base * (1 - mix) + _value_noise(rng, h, w) * mix) * 255.0

    for _ in range(int(rng.integers(1, 4))):  # gratings and checkerboards
        mask = _region_mask(rng, h, w)
        px, py = xx[mask], yy[mask]  # evaluate the pattern on the region only
        theta = rng.uniform(0, math.pi)
        u = np.cos(theta) * px + np.sin(theta) * py
        if rng.random() < 0.6:
            freq = rng.uniform(0.03, 0.45)  # cycles per pixel, up to just below Nyquist
            pattern = 0.5 + 0.5 * np.sin(2 * math.pi * freq * u)
        else:
            cell = float(rng.integers(2, 17))
            v = -np.sin(theta) * px + np.cos(theta) * py
            pattern = (np.floor(u / cell) + np.floor(v / cell)) % 2
        lo, hi = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
        img[mask] = lo + pattern.astype(np.float32)[:, None] * (hi - lo)

    canvas = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 12))):  # sharp shapes
        kind = rng.integers(4)
        aa = cv2.LINE_AA if rng.random() < 0.5 else cv2.LINE_8
        col = _color(rng)
        if kind == 0:
            n = int(rng.integers(3, 7))
            pts = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], -1).astype(np.int32)
            cv2.fillPoly(canvas, [pts], col, aa)
        elif kind == 1:
            cv2.ellipse(canvas, (int(rng.integers(w)), int(rng.integers(h))),
                        (int(rng.integers(2, w // 4 + 3)), int(rng.integers(2, h // 4 + 3))),
                        float(rng.uniform(0, 180)), 0, 360, col, -1 if rng.random() < 0.7 else int(rng.integers(1, 5)),
                        aa)
        elif kind == 2:
            cv2.line(canvas, (int(rng.integers(w)), int(rng.integers(h))), (int(rng.integers(w)), int(rng.integers(h))),
                     col, int(rng.integers(1, 7)), aa)
        else:
            letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            text = "".join(letters[int(i)] for i in rng.integers(0, len(letters), int(rng.integers(2, 9))))
            cv2.putText(canvas, text, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(0, 8)),
                        float(rng.uniform(0.4, 2.5)) * max(h, w) / 512, col, int(rng.integers(1, 4)), aa)
    return canvas


class SyntheticSource:
    """``num_images`` procedural images (``synthetic_image``) of ``height x width``, fixed by ``seed``.

    Needs no files: the default source of tiny configs and tests. Items carry the decoded uint8 image.
    """

    def __init__(self, num_images: int = 256, height: int = 576, width: int = 576, seed: int = 0,
                 prompt_text: str = ""):
        if num_images < 1 or height < 1 or width < 1:
            raise ValueError(f"SyntheticSource: num_images, height and width must be positive, got "
                             f"{num_images}, {height}, {width}")
        self.num_images, self.height, self.width, self.seed = int(num_images), int(height), int(width), int(seed)
        self.prompt_text = prompt_text

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticSource index {index} out of range [0, {self.num_images})")
        return {"name": f"synthetic:{self.seed}/{index}", "prompt": self.prompt_text,
                "image": synthetic_image(self.seed, index, self.height, self.width)}
