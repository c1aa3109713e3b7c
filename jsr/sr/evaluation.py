"""Benchmark evaluation of a one-step SR model: datasets, the control-``t`` sweep, metrics, tables, plot, samples.

    ds = [EvalDataset(parse_dataset("RealSR:lq=RealSR/LR,hq=RealSR/HR"))]
    suite = load_metrics(lpips=["vgg16-397923af.pth", "lpips_vgg.pth"], inception="pt_inception-....pth")
    report = evaluate(ds, "results/ctsr", restorer=load_restorer(...), t_values=[0, 0.5, 1], suite=suite)
    write_outputs(report, "results/ctsr")   # results.md / .csv / .json, fidelity_realism.png

(``evaluate.py`` at the repository root is the command line.)

**Datasets** (:func:`parse_dataset`): paired LQ/HQ folders matched by file stem (RealSR and DRealSR as the papers
use them, 128 -> 512), or an HQ folder whose images are (optionally centre-cropped and) degraded on the fly with
the Real-ESRGAN pipeline (:func:`jsr.data.degradation.degrade`), each image from its own generator seeded by
``(seed, crc32(name))``: the same LQ on every run and machine, whatever other files the folder holds (DIV2K-val
512 crops). The degraded LQ and the cropped HQ are written out, so other methods can be run on the same inputs and
compared with ``compare``.

**Protocol.** Each LQ is upscaled (bicubic, ``upscale``) and restored (:class:`jsr.sr.infer.Restorer`, any size);
the SR image is rounded to 8 bits (what the saved PNG holds: papers measure files) and compared with the HQ:
PSNR and SSIM on the BT.601 Y channel (``crop_border`` pixels dropped, 0 by default as pyiqa-based evaluations of
OSEDiff/PiSA-SR/CTSR), LPIPS-VGG, DISTS, FID between the set of HQ images and the set of SR images (Inception
features of the in-memory 8-bit images: exactly ``fid_from_folders(HQ folder, SR folder)`` when the HQ folder holds
the dataset's images), NIQE, and MUSIQ / MANIQA-PIPAL / CLIPIQA through pyiqa. A metric whose weights are not given
is skipped (and the reason recorded); PSNR/SSIM always run. NIQE is NaN for an image with fewer than two usable
96x96 blocks; FID is NaN for fewer than two images. Table means ignore NaN and count them.

**Timing**: the seconds of each restorer call (upscaled input to SR array on the host). The first call at a new
input size includes compilation: those calls are flagged and left out of the per-image mean; the very first call
is reported on its own.

**Outputs** (:func:`write_outputs`): ``results.md`` (the CTSR paper's Tables 2/3 layout: Datasets | Method |
metrics with arrows, best in bold and second in italics per dataset; and per dataset its Table 10 layout: Timestep
t | metrics), ``results.csv`` (one row per dataset x method x t), ``results.json`` (everything, including a row per
image and t), ``fidelity_realism.png`` (PSNR against LPIPS and DISTS along t), ``samples_<dataset>.png`` (crops:
LQ | SR at each t | HQ) and the SR images themselves.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from jsr.data import degradation as degradation_lib
from jsr.data.sources import IMAGE_EXTENSIONS, PairedFolderSource, list_images, load_image
from jsr.metrics import dists_distance, load_dists_params, load_lpips_params, lpips_distance, psnr, ssim
from jsr.metrics import fid as fid_lib
from jsr.metrics import niqe as niqe_lib
from jsr.metrics import pyiqa_bridge
from jsr.metrics.inception import load_inception_params
from jsr.sr.infer import Restorer, RestoreOptions, check_options, upscale_bicubic


class Column(NamedTuple):
    """A metric column: key (JSON/CSV), title (tables), whether higher is better, decimals shown."""

    key: str
    title: str
    higher_better: bool
    decimals: int

    @property
    def header(self) -> str:
        return f"{self.title}{'↑' if self.higher_better else '↓'}"


# The CTSR paper's column order (Tables 2, 3, 10); "CLIQQA" there is CLIPIQA.
COLUMNS = (
    Column("psnr", "PSNR", True, 2), Column("ssim", "SSIM", True, 4), Column("lpips", "LPIPS", False, 4),
    Column("dists", "DISTS", False, 4), Column("fid", "FID", False, 2), Column("niqe", "NIQE", False, 4),
    Column("musiq", "MUSIQ", True, 2), Column("maniqa", "MANIQA", True, 4), Column("clipiqa", "CLIPIQA", True, 4),
)
COLUMN = {c.key: c for c in COLUMNS}
PYIQA_METRICS = ("musiq", "maniqa", "clipiqa")
METHOD_LABELS = {"ctsr": "CTSR", "osediff": "OSEDiff", "pisasr": "PiSA-SR"}


# ----------------------------------------------------------------------------------------------------------------
# Datasets


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def parse_compare(text: str) -> tuple[str, str]:
    """``LABEL=DIR`` -> (label, folder template). ``{dataset}`` in DIR is replaced by each dataset's name."""
    label, eq, folder = text.partition("=")
    if not eq or not label.strip() or not folder.strip():
        raise ValueError(f"compare {text!r}: want LABEL=DIR (DIR may contain {{dataset}})")
    return label.strip(), folder.strip()


class _SRFolder:
    """Another method's SR images for one dataset, matched to the dataset's keys (or to the LQ file stems)."""

    def __init__(self, label: str, folder: str, ds: EvalDataset):
        self.label, self.folder = label, Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"compare {label}: folder {str(self.folder)!r} (dataset {ds.name}) does not exist")
        index: dict[str, str] = {}
        for p in list_images(self.folder):
            index.setdefault(_key(p, self.folder, ds.spec.strip), str(p))
            index.setdefault(p.relative_to(self.folder).with_suffix("").as_posix(), str(p))
        self.paths = {}
        missing = []
        for i, name in enumerate(ds.names):
            lq = ds.lq_paths[i]
            alt = Path(lq).relative_to(ds.spec.lq).with_suffix("").as_posix() if lq else name
            path = index.get(name) or index.get(alt)
            if path is None:
                missing.append(name)
            self.paths[name] = path
        if missing:
            raise ValueError(f"compare {label}: {len(missing)} of {len(ds)} images of {ds.name} have no SR file in "
                             f"{str(self.folder)!r} (by name or LQ file name): {missing[:10]}")

    def load(self, name: str) -> np.ndarray:
        return load_image(self.paths[name])


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def check_inputs(datasets: Sequence[EvalDataset], compare: Sequence[tuple[str, str]] = (),
                 upscale: float = 4.0) -> dict[str, list[_SRFolder]]:
    """Everything about the inputs that can fail, checked before any model runs (file headers only): unique
    dataset names, non-empty sets, every paired HQ the size of its LQ upscaled, every compare folder holding an
    image for every test image. Returns the matched compare folders per dataset. Raises ValueError (or
    FileNotFoundError) listing what is wrong."""
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
        matched[ds.name] = [_SRFolder(lab, f.replace("{dataset}", ds.name), ds) for lab, f in compare]
    return matched


# ----------------------------------------------------------------------------------------------------------------
# Metrics


_lpips_jit = jax.jit(lpips_distance)
_dists_jit = jax.jit(dists_distance)


@dataclasses.dataclass
class MetricSuite:
    """The metrics to compute and their parameters (``None``: skipped; see :func:`load_metrics`).

    Attributes:
      lpips, dists, inception: :class:`jsr.metrics.LPIPS` / ``DISTS`` / ``FIDInceptionV3`` parameter trees.
      niqe: pristine model (:class:`jsr.metrics.niqe.NIQEParams`).
      pyiqa: names among ``musiq``, ``maniqa``, ``clipiqa`` to score through pyiqa.
      crop_border: pixels dropped from every edge for PSNR/SSIM.
      fid_batch: images per Inception call.
      fid_dims: Inception feature width for FID (2048, the standard; 64, 192, 768 as pytorch-fid's ``--dims``).
      pyiqa_device: torch device for pyiqa.
      skipped: metric key -> why it is not computed (reported in the tables).
    """

    lpips: Any = None
    dists: Any = None
    inception: Any = None
    niqe: niqe_lib.NIQEParams | None = None
    pyiqa: tuple[str, ...] = ()
    crop_border: int = 0
    fid_batch: int = 50
    fid_dims: int = 2048
    pyiqa_device: str = "cpu"
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def keys(self) -> list[str]:
        """The computed metrics, in table order."""
        on = {"psnr": True, "ssim": True, "lpips": self.lpips is not None, "dists": self.dists is not None,
              "fid": self.inception is not None, "niqe": self.niqe is not None}
        on.update({k: k in self.pyiqa for k in PYIQA_METRICS})
        return [c.key for c in COLUMNS if on[c.key]]

    def skipped_reasons(self) -> dict[str, str]:
        """Every table metric not computed, with the reason."""
        on = set(self.keys())
        return {c.key: self.skipped.get(c.key, "not requested") for c in COLUMNS if c.key not in on}

    def image_metrics(self, sr: np.ndarray, hq: np.ndarray) -> dict[str, float]:
        """The per-image metrics of one SR image against its HQ (both [H, W, 3] in [0, 1], same shape). NIQE is
        NaN when the image has too few usable blocks."""
        if sr.shape != hq.shape:
            raise ValueError(f"SR {sr.shape} and HQ {hq.shape} differ in shape")
        out = {"psnr": float(psnr(sr, hq, crop_border=self.crop_border)),
               "ssim": float(ssim(sr, hq, crop_border=self.crop_border))}
        if self.lpips is not None:
            out["lpips"] = float(_lpips_jit(self.lpips, sr[None], hq[None])[0])
        if self.dists is not None:
            out["dists"] = float(_dists_jit(self.dists, hq[None], sr[None])[0])  # DISTS(reference, distorted)
        if self.niqe is not None:
            try:
                out["niqe"] = float(niqe_lib.niqe(sr, self.niqe))
            except ValueError:  # too small for two 96x96 blocks with finite features
                out["niqe"] = math.nan
        for name in self.pyiqa:
            out[name] = float(pyiqa_bridge.score(name, sr, device=self.pyiqa_device))
        return out


def load_metrics(*, lpips: Sequence[str] = (), dists: Sequence[str] = (), inception: str = "", niqe: str = "",
                 pyiqa: Sequence[str] = ("auto",), crop_border: int = 0, fid_batch: int = 50,
                 fid_dims: int = 2048, pyiqa_device: str = "cpu") -> MetricSuite:
    """A :class:`MetricSuite` from weight files (empty = skip that metric).

    Args:
      lpips: files for :func:`jsr.metrics.load_lpips_params` (torchvision VGG16 + the LPIPS ``vgg.pth`` heads, or
        one file from ``save_lpips_weights``).
      dists: files for :func:`jsr.metrics.load_dists_params` (VGG16 + DISTS' ``weights.pt``, or one saved file).
      inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or its safetensors) for FID.
      niqe: pristine NIQE parameters (basicsr's ``niqe_pris_params.npz`` or MATLAB's ``modelparameters.mat``).
      pyiqa: ``auto`` (each of musiq/maniqa/clipiqa whose pyiqa and weights are present), ``none``, or names
        (each must be available).
    Raises:
      FileNotFoundError / ValueError from the loaders; ValueError for a requested pyiqa metric that is not
      available.
    """
    skipped = {}
    if fid_dims not in (64, 192, 768, 2048):
        raise ValueError(f"fid_dims must be 64, 192, 768 or 2048, got {fid_dims}")
    suite = MetricSuite(crop_border=crop_border, fid_batch=fid_batch, fid_dims=fid_dims,
                        pyiqa_device=pyiqa_device, skipped=skipped)
    if lpips:
        suite.lpips = load_lpips_params(*lpips)
    else:
        skipped["lpips"] = "no LPIPS weights given (--lpips)"
    if dists:
        suite.dists = load_dists_params(*dists)
    else:
        skipped["dists"] = "no DISTS weights given (--dists)"
    if inception:
        suite.inception = load_inception_params(inception)
    else:
        skipped["fid"] = "no Inception weights given (--fid_inception)"
    if niqe:
        suite.niqe = niqe_lib.load_niqe_params(niqe)
    else:
        skipped["niqe"] = "no NIQE pristine parameters given (--niqe)"
    names = [n.strip().lower() for n in pyiqa if n.strip()]
    if names == ["auto"]:
        chosen = [n for n in PYIQA_METRICS if pyiqa_bridge.available(n)]
        for n in PYIQA_METRICS:
            if n not in chosen:
                skipped[n] = ("pyiqa or its weights are not available (files: "
                              f"{', '.join(str(p) for p in pyiqa_bridge.required_files(n))})")
    elif names in ([], ["none"]):
        chosen = []
        skipped.update({n: "pyiqa metrics disabled (--pyiqa=none)" for n in PYIQA_METRICS})
    else:
        bad = [n for n in names if n not in PYIQA_METRICS]
        if bad:
            raise ValueError(f"unknown pyiqa metric(s) {bad}; choose from {list(PYIQA_METRICS)}, 'auto' or 'none'")
        missing = [n for n in names if not pyiqa_bridge.available(n)]
        if missing:
            files = [str(p) for n in missing for p in pyiqa_bridge.required_files(n)]
            raise ValueError(f"pyiqa metric(s) {missing} requested but not available: pyiqa must import and the "
                             f"weights must be on disk ({files})")
        chosen = names
        skipped.update({n: "not requested (--pyiqa)" for n in PYIQA_METRICS if n not in names})
    suite.pyiqa = tuple(chosen)
    return suite


class _FeatureBuffer:
    """Inception features of a stream of images, computed ``batch`` at a time (8-bit copies wait in between)."""

    def __init__(self, params: Any, batch: int, dims: int):
        self.params, self.batch, self.dims = params, batch, dims
        self.pending: list[np.ndarray] = []
        self.done: list[np.ndarray] = []

    def add(self, img01: np.ndarray) -> None:
        self.pending.append(np.round(np.clip(img01, 0, 1) * 255).astype(np.uint8))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            imgs = [p.astype(np.float32) / 255.0 for p in self.pending]
            self.done.append(fid_lib.image_activations(imgs, self.params, batch_size=self.batch, dims=self.dims))
            self.pending = []

    def features(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.done) if self.done else np.zeros((0, self.dims), np.float32)


def _feature_buffer(suite: MetricSuite) -> _FeatureBuffer | None:
    return None if suite.inception is None else _FeatureBuffer(suite.inception, suite.fid_batch, suite.fid_dims)


def _fid(real: np.ndarray, fake: np.ndarray) -> tuple[float, str]:
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return math.nan, "FID needs at least 2 images"
    try:
        mu1, s1 = fid_lib.activation_statistics(real)
        mu2, s2 = fid_lib.activation_statistics(fake)
        return fid_lib.frechet_distance(mu1, s1, mu2, s2), ""
    except ValueError as e:
        return math.nan, f"FID failed: {e}"


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _quantize(x: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _save_png(path: Path, img01: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img01, 0, 1) * 255).astype(np.uint8)).save(path)


def t_label(t: float | None) -> str:
    """``0.2`` -> ``"0.2"``, ``1`` -> ``"1.0"`` (the paper's way), ``0.25`` -> ``"0.25"``."""
    return "" if t is None else f"{t:.1f}" if round(t, 1) == t else f"{t:g}"


class _Entry:
    """One table row in the making: a method (the model at one ``t``, or a folder of SR images) on one dataset."""

    def __init__(self, method: str, t: float | None, folder: _SRFolder | None, opts: RestoreOptions | None,
                 out: Path | None, suite: MetricSuite):
        self.method, self.t, self.folder, self.opts, self.out = method, t, folder, opts, out
        self.label = method if t is None else f"{method} (t={t_label(t)})"
        self.images: list[dict] = []
        self.feats = _feature_buffer(suite)


class _Timer:
    """Seconds of each restorer call; a call at an input size not seen before includes compilation."""

    def __init__(self):
        self.seen: set[tuple[int, ...]] = set()
        self.first: float | None = None
        self.warm: list[float] = []

    def call(self, restorer: Restorer, up: np.ndarray, opts: RestoreOptions) -> tuple[np.ndarray, dict]:
        start = time.perf_counter()
        sr = restorer(up[None], opts)[0]  # a host array: the device work is finished
        seconds = time.perf_counter() - start
        compiled = up.shape not in self.seen
        self.seen.add(up.shape)
        if self.first is None:
            self.first = seconds
        elif not compiled:
            self.warm.append(seconds)
        return sr, {"seconds": seconds, "includes_compile": compiled}


def _sr_image(dataset: str, e: _Entry, img: EvalImage, up: np.ndarray, restorer: Restorer | None, timer: _Timer,
              suite: MetricSuite) -> np.ndarray:
    """Produce (or read) entry ``e``'s 8-bit SR image of ``img``, save it, measure it, record its image row."""
    row: dict[str, Any] = {"dataset": dataset, "method": e.method, "t": e.t, "name": img.name}
    if e.folder is not None:
        sr = e.folder.load(img.name)
        if sr.shape != img.hq.shape:
            raise ValueError(f"compare {e.method}: {e.folder.paths[img.name]} is {sr.shape[1]}x{sr.shape[0]}, "
                             f"its HQ {img.hq.shape[1]}x{img.hq.shape[0]}")
        row["sr_path"] = e.folder.paths[img.name]
    else:
        sr, timing = timer.call(restorer, up, e.opts)
        row.update(timing)
    sr = _quantize(sr)
    if e.out is not None:
        path = e.out / f"{img.name}.png"
        _save_png(path, sr)
        row["sr_path"] = str(path)
    row.update(suite.image_metrics(sr, img.hq))
    if e.feats is not None:
        e.feats.add(sr)
    e.images.append(row)
    return sr


def _summary(dataset: str, e: _Entry, keys: Sequence[str], real: np.ndarray | None) -> dict:
    """The table row of entry ``e``: NaN-ignoring means (NaN counts in ``notes``), FID, seconds per image."""
    row = {"dataset": dataset, "method": e.method, "t": e.t, "label": e.label, "n": len(e.images)}
    notes = {}
    for key in keys:
        if key == "fid":
            row["fid"], why = _fid(real, e.feats.features())
            if why:
                notes["fid"] = why
            continue
        vals = np.asarray([r[key] for r in e.images], np.float64)
        finite = np.isfinite(vals)
        row[key] = float(vals[finite].mean()) if finite.any() else math.nan
        if not finite.all():
            notes[key] = f"{int((~finite).sum())} of {len(vals)} images NaN (left out of the mean)"
    timed = [r["seconds"] for r in e.images if "seconds" in r and not r["includes_compile"]]
    row["seconds_per_image"] = float(np.mean(timed)) if timed else None
    if notes:
        row["notes"] = notes
    return row


def evaluate(datasets: Sequence[EvalDataset], out_dir: str | os.PathLike, *, restorer: Restorer | None,
             suite: MetricSuite, t_values: Sequence[float] | None = None,
             options: RestoreOptions = RestoreOptions(), label: str | None = None,
             compare: Sequence[tuple[str, str]] = (), upscale: float = 4.0, save_images: bool = True,
             num_samples: int = 4, sample_crop: int = 256, progress: bool = True,
             log: Callable[[str], None] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """Run the model (at each ``t``) and the ``compare`` methods over every dataset and measure them.

    Args:
      datasets: the test sets.
      out_dir: where SR images (``<dataset>/<method>/t<t>/<name>.png``), degraded inputs (``<dataset>/LQ``, ``HQ``,
        for HQ-only sets) and sample grids (``samples_<dataset>.png``) go.
      restorer: the model (``None``: only ``compare`` folders are measured).
      suite: the metrics (:func:`load_metrics`).
      t_values: control values swept (CTSR); ``None`` = one run at ``options.t`` with no t in the rows (other
        methods). Every value must be a control the restorer honours (:func:`jsr.sr.infer.check_options`).
      options: restoration options (tiling, colour fix...); ``t`` is replaced by each swept value.
      label: the model's name in the tables (default from its method: ``CTSR``, ``OSEDiff``, ``PiSA-SR``).
      compare: ``(label, folder)`` pairs of other methods' SR images (``{dataset}`` in the folder is replaced),
        matched to the dataset's keys or LQ file names; listed before the model, as the paper lists baselines.
      upscale: output size / LQ size; every HQ must be the upscaled LQ's size.
      num_samples, sample_crop: images per sample grid and the crop side in output pixels (0 images: no grid).
      progress: tqdm bars on stderr. log: message sink (stderr by default).
      meta: extra facts recorded under ``"config"`` in the report (the command line's flags).
    Returns:
      the report (JSON-ready dict): ``rows`` (one per dataset x method x t, with means), ``images`` (one per image
      x method x t), ``columns``, ``skipped_metrics``, ``timing``, ``config``; write it with :func:`write_outputs`.
    Raises:
      ValueError before any restoration for bad t values, unmatched compare folders, or an HQ whose size is not
      the upscaled LQ's (:func:`check_inputs`).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out_dir)
    if restorer is None and not compare:
        raise ValueError("nothing to evaluate: give a restorer and/or compare folders")
    model_label = label or (METHOD_LABELS.get(restorer.method, restorer.method) if restorer else "")
    runs: list[tuple[float | None, RestoreOptions]] = []
    if restorer is not None:
        sweep = [None] if t_values is None else list(dict.fromkeys(float(t) for t in t_values))
        if not sweep:
            raise ValueError("t_values is empty")
        for t in sweep:
            opts = options if t is None else dataclasses.replace(options, t=t)  # validates 0 <= t <= 1
            check_options(restorer, opts)
            runs.append((t, opts))
    labels = [lab for lab, _ in compare] + ([model_label] if restorer else [])
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}")
    matched = check_inputs(datasets, compare, upscale)
    out.mkdir(parents=True, exist_ok=True)
    metric_keys = suite.keys()
    rows: list[dict] = []
    image_rows: list[dict] = []
    timer = _Timer()
    sample_files: dict[str, str] = {}

    for ds in datasets:
        ds_dir = out / _slug(ds.name)
        entries = [_Entry(f.label, None, f, None, None, suite) for f in matched[ds.name]]
        for t, opts in runs:
            sub = ds_dir / _slug(model_label) / ("" if t is None else f"t{t_label(t)}")
            entries.append(_Entry(model_label, t, None, opts, sub if save_images else None, suite))
        hq_feats = _feature_buffer(suite)
        samples: list[tuple[str, list[np.ndarray]]] = []
        for i in tqdm(range(len(ds)), desc=ds.name, unit="img", disable=not progress, file=sys.stderr):
            img = ds[i]
            up = upscale_bicubic(img.lq, upscale)
            if up.shape != img.hq.shape:  # check_inputs read the headers; the decoded images must agree
                raise ValueError(f"dataset {ds.name}: {img.name}: LQ x{upscale:g} is {up.shape[1]}x{up.shape[0]}, "
                                 f"its HQ {img.hq.shape[1]}x{img.hq.shape[0]}")
            if not ds.spec.paired and save_images:
                _save_png(ds_dir / "LQ" / f"{img.name}.png", img.lq)
                _save_png(ds_dir / "HQ" / f"{img.name}.png", img.hq)
            if hq_feats is not None:
                hq_feats.add(img.hq)
            srs = [_sr_image(ds.name, e, img, up, restorer, timer, suite) for e in entries]
            if i < num_samples:
                lq_big = Image.fromarray(np.round(img.lq * 255).astype(np.uint8)).resize(
                    (up.shape[1], up.shape[0]), Image.NEAREST)  # LQ pixels as they are, at the output size
                samples.append((img.name, [np.asarray(lq_big, np.float32) / 255.0] + srs + [img.hq]))
        real = hq_feats.features() if hq_feats is not None else None
        for e in entries:
            rows.append(_summary(ds.name, e, metric_keys, real))
            image_rows.extend(e.images)
        if samples:
            path = out / f"samples_{_slug(ds.name)}.png"
            sample_grid(samples, ["LQ"] + [e.label for e in entries] + ["HQ"], sample_crop).save(path)
            sample_files[ds.name] = str(path)
        log(f"{ds.name}: {len(ds)} images x {len(entries)} method(s)/t done")

    return {
        "format": "jsr-evaluation-1",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": dict(meta or {}),
        "datasets": [{"name": d.name, "images": len(d), **dataclasses.asdict(d.spec)} for d in datasets],
        "model": {"label": model_label, "method": restorer.method if restorer else None,
                  "t_values": None if t_values is None else [t for t, _ in runs],
                  "options": dataclasses.asdict(options)},
        "columns": [c._asdict() | {"header": c.header} for c in COLUMNS if c.key in metric_keys],
        "skipped_metrics": suite.skipped_reasons(),
        "crop_border": suite.crop_border,
        "fid_dims": suite.fid_dims if suite.inception is not None else None,
        "timing": {"first_call_seconds": timer.first,
                   "seconds_per_image": float(np.mean(timer.warm)) if timer.warm else None,
                   "timed_calls": len(timer.warm), "backend": jax.default_backend(),
                   "device": str(jax.devices()[0].device_kind),
                   "note": "restorer calls only; calls at a new input size include compilation and are left out "
                           "of seconds_per_image; first_call_seconds is the very first call"},
        "samples": sample_files,
        "rows": rows,
        "images": image_rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# Sample grid


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], titles: Sequence[str], crop: int = 256,
                gap: int = 4) -> Image.Image:
    """A grid of centre crops: one row per image (its name in the first tile), one column per title.

    Args:
      rows: ``(name, [img, ...])`` with one [H, W, 3] float [0, 1] image per title, all of one size per row.
      titles: column headers (``LQ``, each method/t, ``HQ``).
      crop: crop side in pixels (smaller images are shown whole).
    Returns:
      an RGB PIL image.
    """
    font = _font(12)
    head = 18
    tile_h = [min(crop, imgs[0].shape[0]) for _, imgs in rows]
    tile_w = max(min(crop, imgs[0].shape[1]) for _, imgs in rows)
    col_w = max(tile_w, max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) + 6
                            for t in titles))
    width = len(titles) * col_w + (len(titles) + 1) * gap
    height = head + sum(tile_h) + (len(rows) + 1) * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((gap + j * (col_w + gap) + 2, 2), t, fill="black", font=font)
    y = head + gap
    for (name, imgs), th in zip(rows, tile_h):
        if len(imgs) != len(titles):
            raise ValueError(f"sample {name}: {len(imgs)} images for {len(titles)} columns")
        h, w = imgs[0].shape[:2]
        tw = min(crop, w)
        y0, x0 = (h - th) // 2, (w - tw) // 2
        for j, img in enumerate(imgs):
            tile = np.round(np.clip(img[y0:y0 + th, x0:x0 + tw], 0, 1) * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(tile), (gap + j * (col_w + gap), y))
        box = draw.textbbox((gap + 2, y + 2), name, font=font)
        draw.rectangle(box, fill="black")
        draw.text((gap + 2, y + 2), name, fill="white", font=font)
        y += th + gap
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Tables and plot


def _columns(report: Mapping) -> list[Column]:
    return [COLUMN[c["key"]] for c in report["columns"]]


def _fmt(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{decimals}f}"


def _ranks(rows: Sequence[Mapping], col: Column) -> dict[int, int]:
    """Row index -> 1 (best) or 2 (second best) for ``col`` among ``rows`` (finite values; ties share a rank)."""
    vals = sorted({round(r[col.key], col.decimals) for r in rows
                   if r.get(col.key) is not None and math.isfinite(r[col.key])}, reverse=col.higher_better)
    ranks = {}
    for i, r in enumerate(rows):
        v = r.get(col.key)
        if v is not None and math.isfinite(v) and len(rows) > 1:
            k = vals.index(round(v, col.decimals)) + 1
            if k <= 2:
                ranks[i] = k
    return ranks


def _mark(text: str, rank: int | None) -> str:
    return f"**{text}**" if rank == 1 else f"_{text}_" if rank == 2 else text


def markdown_tables(report: Mapping) -> str:
    """The report as Markdown: the Tables 2/3 layout (``Datasets | Method | metrics``), per swept dataset the
    Table 10 layout (``Timestep t | metrics``), timing, and the skipped metrics. Best per dataset in bold, second
    in italics (the paper's red and blue)."""
    cols = _columns(report)
    lines = [f"# Evaluation: {report['model']['label'] or 'SR folders'}", ""]
    lines += [f"Created {report['created']}; PSNR/SSIM on the Y channel (crop border {report['crop_border']}); "
              "best per dataset in **bold**, second in _italics_; — = not defined (see notes)."
              + ("" if report.get("fid_dims") in (None, 2048) else
                 f" FID on {report['fid_dims']}-d Inception features: not comparable with published FID."), ""]
    lines += ["## Comparison (CTSR Tables 2/3 layout)", ""]
    lines.append("| Datasets | Method | " + " | ".join(c.header for c in cols) + " |")
    lines.append("|---|---|" + "---:|" * len(cols))
    by_ds: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_ds.setdefault(r["dataset"], []).append(r)
    for ds, rows in by_ds.items():
        ranks = {c.key: _ranks(rows, c) for c in cols}
        for i, r in enumerate(rows):
            cells = [_mark(_fmt(r.get(c.key), c.decimals), ranks[c.key].get(i)) for c in cols]
            lines.append(f"| {ds if i == 0 else ''} | {r['label']} | " + " | ".join(cells) + " |")
    for ds, rows in by_ds.items():
        sweep = [r for r in rows if r["t"] is not None]
        if len(sweep) < 2:
            continue
        lines += ["", f"## Control sweep on {ds} (CTSR Table 10 layout, {sweep[0]['method']})", ""]
        lines.append("| Timestep t | " + " | ".join(c.header for c in cols) + " |")
        lines.append("|---:|" + "---:|" * len(cols))
        ranks = {c.key: _ranks(sweep, c) for c in cols}
        for i, r in enumerate(sweep):
            cells = [_mark(_fmt(r.get(c.key), c.decimals), ranks[c.key].get(i)) for c in cols]
            lines.append(f"| {t_label(r['t'])} | " + " | ".join(cells) + " |")
    tm = report["timing"]
    lines += ["", "## Timing", ""]
    if tm["first_call_seconds"] is not None:
        per = "—" if tm["seconds_per_image"] is None else f"{tm['seconds_per_image']:.3f} s"
        lines.append(f"Per image (restorer call, compiled): {per} over {tm['timed_calls']} calls; first call "
                     f"(with compilation): {tm['first_call_seconds']:.2f} s; device: {tm['device']} "
                     f"({tm['backend']}).")
    else:
        lines.append("No model was run.")
    notes = [f"- {r['dataset']} / {r['label']}: {k}: {v}"
             for r in report["rows"] for k, v in r.get("notes", {}).items()]
    skipped = [f"- {COLUMN[k].title}: {v}" for k, v in report["skipped_metrics"].items()]
    if skipped:
        lines += ["", "## Metrics not computed", ""] + skipped
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def csv_table(report: Mapping) -> str:
    """One CSV row per dataset x method x t: ``Datasets, Method, t, N, <metric headers with arrows>,
    seconds/image`` (full precision; empty cells for undefined values)."""
    cols = _columns(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Datasets", "Method", "t", "N"] + [c.header for c in cols] + ["seconds/image"])
    for r in report["rows"]:
        vals = [r.get(c.key) for c in cols] + [r.get("seconds_per_image")]
        w.writerow([r["dataset"], r["method"], "" if r["t"] is None else repr(r["t"]), r["n"]]
                   + ["" if v is None or not math.isfinite(v) else repr(float(v)) for v in vals])
    return buf.getvalue()


def _json_ready(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating, np.integer)):
        return _json_ready(x.item())
    if isinstance(x, Mapping):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def plot_fidelity_realism(report: Mapping, path: str | os.PathLike) -> list[str]:
    """PSNR (fidelity, up) against LPIPS and DISTS (realism distance, left = better) for every dataset: the swept
    model as a line through its t values (each labelled), compare methods as single points. Falls back to the
    first other perceptual metric computed when neither LPIPS nor DISTS is. Returns the x-axis metrics plotted
    (empty: nothing to plot, no file written)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [c.key for c in _columns(report)]
    xs = [k for k in ("lpips", "dists") if k in keys] or [k for k in ("fid", "niqe", "musiq", "maniqa", "clipiqa")
                                                         if k in keys][:1]
    rows = [r for r in report["rows"] if r.get("psnr") is not None and math.isfinite(r["psnr"])]
    if not xs or not rows:
        return []
    fig = Figure(figsize=(5.2 * len(xs), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    colours = [f"C{i % 10}" for i in range(len(datasets))]
    for k, x in enumerate(xs):
        ax = fig.add_subplot(1, len(xs), k + 1)
        col = COLUMN[x]
        for ds, colour in zip(datasets, colours):
            mine = [r for r in rows if r["dataset"] == ds and r.get(x) is not None and math.isfinite(r[x])]
            sweep = [r for r in mine if r["t"] is not None]
            if sweep:
                ax.plot([r[x] for r in sweep], [r["psnr"] for r in sweep], "o-", color=colour,
                        label=f"{ds}: {sweep[0]['method']} (t)")
                for r in sweep:
                    ax.annotate(t_label(r["t"]), (r[x], r["psnr"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8, color=colour)
            for j, r in enumerate(r for r in mine if r["t"] is None):
                ax.plot([r[x]], [r["psnr"]], "sD^v<>"[j % 6], color=colour, label=f"{ds}: {r['method']}")
        ax.set_xlabel(f"{col.title} ({'higher' if col.higher_better else 'lower'} is better)")
        ax.set_ylabel("PSNR (dB, Y)")
        ax.set_title(f"Fidelity vs realism: PSNR vs {col.title}")
        if not col.higher_better:
            ax.invert_xaxis()  # better realism to the right, better fidelity up
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return xs


def write_outputs(report: Mapping, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``fidelity_realism.png`` (when there is
    something to plot) into ``out_dir``; returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "plot": out / "fidelity_realism.png"}
    report = _json_ready(dict(report))
    if plot_fidelity_realism(report, files["plot"]):
        report["plot"] = str(files["plot"])
    else:
        del files["plot"]
        report["plot"] = None
    files["markdown"].write_text(markdown_tables(report), encoding="utf-8")
    files["csv"].write_text(csv_table(report), encoding="utf-8")
    files["json"].write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")
    return {k: str(v) for k, v in files.items()}


def load_report(path: str | os.PathLike) -> dict:
    """Read a ``results.json`` back (e.g. to re-render tables with :func:`write_outputs`); JSON nulls in metric
    fields become NaN."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    keys = [c["key"] for c in report["columns"]]
    for r in report["rows"] + report["images"]:
        for k in keys:
            if k in r and r[k] is None:
                r[k] = math.nan
    return report

