"""The metrics of an evaluation: which are computed and with which weights (:class:`MetricSuite`,
:func:`load_metrics`), per-image scores, and FID from streamed Inception features."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jsr.eval.columns import COLUMNS
from jsr.metrics import dists_distance, load_dists_params, load_lpips_params, lpips_distance, psnr, ssim
from jsr.metrics import fid as fid_lib
from jsr.metrics import files as metric_files
from jsr.metrics import niqe as niqe_lib
from jsr.metrics import pyiqa_bridge
from jsr.metrics.inception import load_inception_params

PYIQA_METRICS = ("musiq", "maniqa", "clipiqa")

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
      weights: metric key -> ``{"source", "files", "note"}``: where its weights came from (``given``: named by
        the caller; ``found``: discovered by :mod:`jsr.metrics.files`; ``missing``; ``unusable``: found but they
        do not load; ``off``) and the files used (recorded in the report; :func:`weights_summary` prints it).
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
    weights: dict[str, dict] = dataclasses.field(default_factory=dict)

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

    def feature_buffer(self) -> FeatureBuffer | None:
        """A :class:`FeatureBuffer` for FID (``None`` when FID is not computed)."""
        return None if self.inception is None else FeatureBuffer(self.inception, self.fid_batch, self.fid_dims)


OFF = ("none", "off")  # a weights flag set to this turns the metric off instead of looking for its files


def _given(value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [v.strip() for v in items if v and v.strip()]


def _load_weights(suite: MetricSuite, metric: str, given: list[str], flag: str, discover: bool,
                  loader: Callable[..., Any]) -> Any:
    """Parameters of ``metric`` from the files given, else from those :mod:`jsr.metrics.files` finds (when
    ``discover``); ``None`` (and the reason in ``suite.skipped``) when it is off, missing or unusable. A given
    file that does not load raises; a found one only makes the metric unusable, since nobody asked for it."""
    title = metric_files.METRIC_TITLES[metric]
    if [g.lower() for g in given] in ([o] for o in OFF):
        suite.weights[metric] = {"source": "off", "files": [], "note": f"{flag}=none"}
        suite.skipped[metric] = f"turned off ({flag}=none)"
        return None
    if given:
        suite.weights[metric] = {"source": "given", "files": given, "note": flag}
        return loader(*given)
    if not discover:
        suite.weights[metric] = {"source": "missing", "files": [], "note": f"no weights given ({flag})"}
        suite.skipped[metric] = f"no {title} weights given ({flag})"
        return None
    looks = metric_files.metric_lookups(metric)
    found = [str(lk.path) for lk in looks if lk.found]
    if len(found) < len(looks):
        why = metric_files.why_missing(metric, looks)
        suite.weights[metric] = {"source": "missing", "files": found, "note": why}
        suite.skipped[metric] = f"{why}: give {flag}=FILE, or see python -m jsr.metrics files"
        return None
    try:
        params = loader(*found)
    except (ValueError, ImportError, OSError) as e:  # mismatched shapes, damaged file, no torch for a .pth
        note = " ".join(str(e).split())
        suite.weights[metric] = {"source": "unusable", "files": found, "note": note}
        suite.skipped[metric] = f"found {', '.join(found)} but it does not load: {note}"
        return None
    suite.weights[metric] = {"source": "found", "files": found, "note": ""}
    return params


def _pyiqa_ready(name: str) -> tuple[bool, str]:
    """Whether a pyiqa metric can run (its files first: cheap, and pyiqa's import is slow), and why not."""
    why = metric_files.why_missing(name)
    if why:
        return False, why
    if not pyiqa_bridge.available(name):
        return False, "pyiqa is installed but does not import here"
    return True, ""


def load_metrics(*, lpips: Sequence[str] = (), dists: Sequence[str] = (), inception: str = "", niqe: str = "",
                 pyiqa: Sequence[str] = ("auto",), crop_border: int = 0, fid_batch: int = 50,
                 fid_dims: int = 2048, pyiqa_device: str = "cpu", discover: bool = True) -> MetricSuite:
    """A :class:`MetricSuite` from weight files: the ones given, else the ones found where PyTorch packages keep
    them (:mod:`jsr.metrics.files`; ``python -m jsr.metrics files`` lists them).

    Args:
      lpips: files for :func:`jsr.metrics.load_lpips_params` (torchvision VGG16 + the LPIPS ``vgg.pth`` heads, or
        one file from ``save_lpips_weights``).
      dists: files for :func:`jsr.metrics.load_dists_params` (VGG16 + DISTS' ``weights.pt``, or one saved file).
      inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or its safetensors) for FID.
      niqe: pristine NIQE parameters (basicsr's ``niqe_pris_params.npz`` or MATLAB's ``modelparameters.mat``).
        For each of these: empty = look for the files (``discover``), ``"none"`` = skip the metric. Given files
        always win; a given file that does not load raises, a found one that does not load is reported as
        unusable (``suite.skipped``, ``suite.weights``) and its metric skipped.
      pyiqa: ``auto`` (each of musiq/maniqa/clipiqa whose pyiqa and weights are present), ``none``, or names
        (each must be available).
      discover: look for the files that are not given (False: a metric without files is skipped).
    Raises:
      FileNotFoundError / ValueError from the loaders for given files; ValueError for a requested pyiqa metric
      that is not available.
    """
    if fid_dims not in (64, 192, 768, 2048):
        raise ValueError(f"fid_dims must be 64, 192, 768 or 2048, got {fid_dims}")
    suite = MetricSuite(crop_border=crop_border, fid_batch=fid_batch, fid_dims=fid_dims, pyiqa_device=pyiqa_device)
    skipped = suite.skipped
    suite.lpips = _load_weights(suite, "lpips", _given(lpips), "--lpips", discover, load_lpips_params)
    suite.dists = _load_weights(suite, "dists", _given(dists), "--dists", discover, load_dists_params)
    suite.inception = _load_weights(suite, "fid", _given(inception), "--fid_inception", discover,
                                    load_inception_params)
    suite.niqe = _load_weights(suite, "niqe", _given(niqe), "--niqe", discover, niqe_lib.load_niqe_params)
    names = [n.strip().lower() for n in pyiqa if n.strip()]
    source: dict[str, str] = {}
    notes: dict[str, str] = {}
    if names == ["auto"]:
        for n in PYIQA_METRICS:
            ok, why = _pyiqa_ready(n)
            source[n] = "found" if ok else "missing"
            if not ok:
                notes[n] = why
                skipped[n] = f"{why}: see python -m jsr.metrics files"
    elif names in ([], ["none"]):
        source = dict.fromkeys(PYIQA_METRICS, "off")
        skipped.update({n: "pyiqa metrics disabled (--pyiqa=none)" for n in PYIQA_METRICS})
    else:
        bad = [n for n in names if n not in PYIQA_METRICS]
        if bad:
            raise ValueError(f"unknown pyiqa metric(s) {bad}; choose from {list(PYIQA_METRICS)}, 'auto' or 'none'")
        problems = [f"{n}: {why}" for n in names for ok, why in [_pyiqa_ready(n)] if not ok]
        if problems:
            raise ValueError(f"pyiqa metric(s) requested but not available: {'; '.join(problems)}")
        source = {n: "found" if n in names else "off" for n in PYIQA_METRICS}
        skipped.update({n: "not requested (--pyiqa)" for n in PYIQA_METRICS if n not in names})
    suite.pyiqa = tuple(n for n in PYIQA_METRICS if source[n] == "found")
    for n in PYIQA_METRICS:  # pyiqa reads its own files; these are the ones it will find
        suite.weights[n] = {"source": source[n], "note": notes.get(n, skipped.get(n, "")),
                            "files": [str(lk.path) for lk in metric_files.metric_lookups(n) if lk.found]}
    return suite


def weights_summary(suite: MetricSuite) -> list[str]:
    """One line per weighted metric: where its weights come from (given, found, missing, unusable, off) and the
    files, or why not; what ``evaluate.py`` prints before it starts."""
    home = str(Path.home())

    def short(p: str) -> str:
        return "~" + p[len(home):] if home not in ("", "/") and p.startswith(home + "/") else p

    lines = []
    for key, w in suite.weights.items():
        title = metric_files.METRIC_TITLES.get(key, key)
        what = ", ".join(short(f) for f in w["files"]) if w["source"] in ("given", "found") else w["note"]
        lines.append(f"  {title:<8} {w['source']:<8} {what}")
    return lines


class FeatureBuffer:
    """Inception features of a stream of images ([H, W, 3] float in [0, 1], any sizes), computed ``batch`` at a
    time on their 8-bit copies (which wait in between)."""

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
        """All features so far, [n, dims] float32."""
        self.flush()
        return np.concatenate(self.done) if self.done else np.zeros((0, self.dims), np.float32)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> tuple[float, str]:
    """FID between two sets of Inception features ([n, dims] each), and ``""``; or NaN and the reason (fewer
    than 2 images on a side, or a failed matrix square root)."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return math.nan, "FID needs at least 2 images"
    try:
        mu1, s1 = fid_lib.activation_statistics(real)
        mu2, s2 = fid_lib.activation_statistics(fake)
        return fid_lib.frechet_distance(mu1, s1, mu2, s2), ""
    except ValueError as e:
        return math.nan, f"FID failed: {e}"
