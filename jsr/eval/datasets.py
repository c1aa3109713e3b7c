"""The inputs of an evaluation: test sets (paired LQ/HQ folders, or HQ folders degraded on the fly with a fixed
seed), other methods' SR folders matched to them, and the checks run on both before any model does."""

from __future__ import annotations

import collections
import dataclasses
import re
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from jsr.data import degradation as degradation_lib
from jsr.data.sources import IMAGE_EXTENSIONS, PairedFolderSource, list_images, load_image


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One test set.

    Attributes:
      name: its name in the tables (``RealSR``).
      hq: the HQ (ground-truth) folder, searched recursively.
      lq: the LQ folder (paired, matched to HQ by file stem); empty = degrade each HQ image on the fly.
      strip: regular expression removed from every stem before matching (``_(LR\\d*|HR)$`` for names that differ
        by a suffix); also applied to ``compare`` folders.
      seed: degradation seed (HQ-only sets).
      crop: centre-crop each HQ image to ``crop x crop`` before degrading (0: the whole image); HQ-only sets.
      degradation: degradation preset (``realesrgan``, ``pisa``; :mod:`jsr.data.degradation`); HQ-only sets.
    """

    name: str
    hq: str
    lq: str = ""
    strip: str = ""
    seed: int = 0
    crop: int = 0
    degradation: str = "realesrgan"

    @property
    def paired(self) -> bool:
        return bool(self.lq)


_SPEC_KEYS = {f.name for f in dataclasses.fields(DatasetSpec)} - {"name"}
DATASET_HELP = ("NAME:hq=DIR[,lq=DIR][,strip=REGEX][,seed=N][,crop=N][,degradation=PRESET]; with lq the folders "
                "are paired by file stem, without it the HQ images are degraded on the fly (values may not "
                "contain commas)")


def parse_dataset(text: str) -> DatasetSpec:
    """A :class:`DatasetSpec` from ``NAME:key=value,...`` (see ``DATASET_HELP``), e.g.
    ``RealSR:lq=/data/RealSR/test_LR,hq=/data/RealSR/test_HR`` or ``DIV2K-Val:hq=/data/DIV2K_val,crop=512,seed=0``.
    Raises ValueError naming the problem."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or "/" in name:
        raise ValueError(f"dataset {text!r}: want {DATASET_HELP}")
    kw: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _SPEC_KEYS:
            raise ValueError(f"dataset {name}: bad item {item!r}; keys are {sorted(_SPEC_KEYS)}")
        if key in kw:
            raise ValueError(f"dataset {name}: {key} given twice")
        kw[key] = value.strip()
    if not kw.get("hq"):
        raise ValueError(f"dataset {name}: hq=<folder> is required ({DATASET_HELP})")
    for key in ("seed", "crop"):
        if key in kw:
            try:
                kw[key] = int(kw[key])
            except ValueError:
                raise ValueError(f"dataset {name}: {key} must be an integer, got {kw[key]!r}") from None
    if kw.get("crop", 0) < 0:
        raise ValueError(f"dataset {name}: crop must be >= 0")
    if kw.get("lq") and ("crop" in kw or "degradation" in kw or "seed" in kw):
        raise ValueError(f"dataset {name}: crop/seed/degradation apply to HQ-only (degraded) sets, not to paired "
                         "folders")
    if kw.get("strip"):
        try:
            re.compile(kw["strip"])
        except re.error as e:
            raise ValueError(f"dataset {name}: strip={kw['strip']!r} is not a regular expression ({e})") from None
    return DatasetSpec(name=name, **kw)


class EvalImage(NamedTuple):
    """One test image: its key (relative stem), LQ [h, w, 3] and HQ [H, W, 3] float32 in [0, 1], source paths."""

    name: str
    lq: np.ndarray
    hq: np.ndarray
    lq_path: str | None
    hq_path: str


class EvalDataset:
    """The images of a :class:`DatasetSpec`, in sorted key order (random access, read on demand): ``names`` (keys),
    ``lq_paths`` (``None`` entries for degraded sets), ``hq_paths``.

    HQ-only sets: each HQ image is centre-cropped (``spec.crop``), cut to a multiple of ``scale`` and degraded
    (:func:`jsr.data.degradation.degrade`) with its own generator seeded by ``(spec.seed, crc32(name))``: the same
    LQ on every run and machine, whatever other files the folder holds.

    Args:
      spec: the set.
      scale: output size / LQ size (4): degradation scale of HQ-only sets.
      max_images: keep the first ``max_images`` keys (0: all).
    Raises:
      FileNotFoundError for a missing folder or one without images; ValueError for unmatched or duplicate pairs.
    """

    def __init__(self, spec: DatasetSpec, scale: int = 4, max_images: int = 0):
        self.spec = spec
        self.name = spec.name
        for side, folder in (("HQ", spec.hq), ("LQ", spec.lq)):
            if folder and not Path(folder).is_dir():
                raise FileNotFoundError(f"dataset {spec.name}: {side} folder {folder!r} does not exist")
        if spec.paired:
            src = PairedFolderSource(spec.lq, spec.hq, strip=spec.strip)
            keys, self.lq_paths, self.hq_paths = list(src.keys), list(src.lq_paths), list(src.hq_paths)
        else:
            files = list_images(spec.hq)
            if not files:
                raise FileNotFoundError(f"dataset {spec.name}: HQ folder {spec.hq!r} holds no images "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
            root = Path(spec.hq)
            keys = [_key(p, root, spec.strip) for p in files]
            dup = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
            if dup:
                raise ValueError(f"dataset {spec.name}: several HQ files map to the name(s) {dup[:10]}")
            self.lq_paths, self.hq_paths = [None] * len(keys), [str(p) for p in files]
            self._degradation = degradation_lib.resolve_config(spec.degradation)
            if self._degradation.scale != scale:
                raise ValueError(f"dataset {spec.name}: the {spec.degradation!r} degradation has scale "
                                 f"{self._degradation.scale}, the evaluation upscales by {scale}")
        if max_images:
            keys = keys[:max_images]
            self.lq_paths, self.hq_paths = self.lq_paths[:max_images], self.hq_paths[:max_images]
        self.names = keys
        self.scale = scale

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> EvalImage:
        name, hq = self.names[i], load_image(self.hq_paths[i])
        if self.spec.paired:
            return EvalImage(name, load_image(self.lq_paths[i]), hq, self.lq_paths[i], self.hq_paths[i])
        hq = self._crop(hq, name)
        rng = np.random.default_rng([self.spec.seed, zlib.crc32(name.encode())])
        lq = degradation_lib.degrade(hq, rng, self._degradation)["lq_small"]
        return EvalImage(name, lq, hq, None, self.hq_paths[i])

    def _crop(self, hq: np.ndarray, name: str) -> np.ndarray:
        h, w = hq.shape[:2]
        if self.spec.crop:
            c = self.spec.crop
            if h < c or w < c:
                raise ValueError(f"dataset {self.name}: {name} is {w}x{h}, smaller than crop={c}")
            hq = hq[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
            h = w = c
        s = self.scale
        if h < s or w < s:
            raise ValueError(f"dataset {self.name}: {name} is {w}x{h}, smaller than the scale {s}")
        return np.ascontiguousarray(hq[:h - h % s, :w - w % s])  # degrade wants multiples of the scale

    def __repr__(self) -> str:
        kind = "paired" if self.spec.paired else f"degraded (seed {self.spec.seed})"
        return f"EvalDataset({self.name!r}, {len(self)} images, {kind})"


def _key(path: Path, root: Path, strip: str) -> str:
    key = path.relative_to(root).with_suffix("").as_posix()
    return re.sub(strip, "", key) if strip else key


def parse_compare(text: str) -> tuple[str, str]:
    """``LABEL=DIR`` -> (label, folder template). ``{dataset}`` in DIR is replaced by each dataset's name."""
    label, eq, folder = text.partition("=")
    if not eq or not label.strip() or not folder.strip():
        raise ValueError(f"compare {text!r}: want LABEL=DIR (DIR may contain {{dataset}})")
    return label.strip(), folder.strip()


class SRFolder:
    """Another method's SR images for one dataset, matched to the dataset's keys (or to the LQ file stems).

    Raises FileNotFoundError for a missing folder, ValueError when a test image has no SR file."""

    def __init__(self, label: str, folder: str, ds: EvalDataset):
        self.label, self.folder = label, Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"compare {label}: folder {str(self.folder)!r} (dataset {ds.name}) does not exist")
        index: dict[str, str] = {}
        for p in list_images(self.folder):
            index.setdefault(_key(p, self.folder, ds.spec.strip), str(p))
            index.setdefault(p.relative_to(self.folder).with_suffix("").as_posix(), str(p))
        self.paths: dict[str, str] = {}
        missing = []
        for name, lq in zip(ds.names, ds.lq_paths):
            alt = Path(lq).relative_to(ds.spec.lq).with_suffix("").as_posix() if lq else name
            path = index.get(name) or index.get(alt)
            if path is None:
                missing.append(name)
            else:
                self.paths[name] = path
        if missing:
            raise ValueError(f"compare {label}: {len(missing)} of {len(ds)} images of {ds.name} have no SR file in "
                             f"{str(self.folder)!r} (by name or LQ file name): {missing[:10]}")

    def load(self, name: str) -> np.ndarray:
        """The SR image of test image ``name``: [H, W, 3] float32 in [0, 1]."""
        return load_image(self.paths[name])


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def check_inputs(datasets: Sequence[EvalDataset], compare: Sequence[tuple[str, str]] = (),
                 upscale: float = 4.0) -> dict[str, list[SRFolder]]:
    """Everything about the inputs that can fail, checked before any model runs (file headers only): unique
    dataset names, non-empty sets, every paired HQ the size of its LQ upscaled, every degraded set degraded by
    ``upscale``, every compare folder holding an image for every test image. Returns the matched compare folders
    per dataset. Raises ValueError (or FileNotFoundError) listing what is wrong."""
    names = [d.name for d in datasets]
    if not datasets:
        raise ValueError("no datasets given")
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    matched = {}
    for ds in datasets:
        if len(ds) == 0:
            raise ValueError(f"dataset {ds.name} has no images")
        if ds.spec.paired:
            bad = []
            for name, lq, hq in zip(ds.names, ds.lq_paths, ds.hq_paths):
                (w, h), want = _size(lq), _size(hq)
                if (max(1, round(w * upscale)), max(1, round(h * upscale))) != want:
                    bad.append(f"{name} (LQ {w}x{h}, HQ {want[0]}x{want[1]})")
            if bad:
                raise ValueError(f"dataset {ds.name}: {len(bad)} pair(s) where HQ is not x{upscale:g} the LQ: "
                                 f"{bad[:10]}")
        elif ds.scale != upscale:
            raise ValueError(f"dataset {ds.name}: its HQ images are degraded by x{ds.scale}, the evaluation "
                             f"upscales by x{upscale:g}")
        matched[ds.name] = [SRFolder(lab, f.replace("{dataset}", ds.name), ds) for lab, f in compare]
    return matched
