"""Running an evaluation: the restorer (at each swept ``t``) and the ``compare`` folders over every dataset, the
8-bit SR images saved and measured, per-image rows, per-method means, timing, sample grids (:func:`evaluate`)."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from jsr.eval.columns import COLUMNS, t_label
from jsr.eval.datasets import EvalDataset, EvalImage, SRFolder, check_inputs
from jsr.eval.plots import sample_grid
from jsr.data.images import quantize_8bit, write_image
from jsr.eval.suite import MetricSuite, fid_from_features
from jsr.methods.restorer import check_options
from jsr.sr.infer import Restorer, RestoreOptions, upscale_bicubic


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


class _Entry:
    """One table row in the making: a method (the model at one ``t``, or a folder of SR images) on one dataset."""

    def __init__(self, method: str, t: float | None, folder: SRFolder | None, opts: RestoreOptions | None,
                 out: Path | None, suite: MetricSuite, knob: str = "t"):
        self.method, self.t, self.folder, self.opts, self.out = method, t, folder, opts, out
        self.label = method if t is None else f"{method} ({knob}={t_label(t)})"
        self.images: list[dict] = []
        self.feats = suite.feature_buffer()


class _Timer:
    """Seconds of each restorer call, shared equally by the images of the call; a call at an input shape (batch
    included) not seen before includes compilation."""

    def __init__(self):
        self.seen: set[tuple[int, ...]] = set()
        self.first: float | None = None
        self.warm: list[float] = []

    def call(self, restorer: Restorer, ups: np.ndarray, opts: RestoreOptions) -> tuple[np.ndarray, list[dict]]:
        """Restore the same-size batch ``ups`` [n, H, W, 3]; returns the SR images and one timing row per image."""
        start = time.perf_counter()
        sr = restorer(ups, opts)  # a host array: the device work is finished
        seconds = time.perf_counter() - start
        per_image = seconds / len(ups)
        compiled = ups.shape not in self.seen
        self.seen.add(ups.shape)
        if self.first is None:
            self.first = seconds
        elif not compiled:
            self.warm.extend([per_image] * len(ups))
        return sr, [{"seconds": per_image, "includes_compile": compiled} for _ in range(len(ups))]


def _sr_image(dataset: str, e: _Entry, img: EvalImage, restored: tuple[np.ndarray, dict] | None,
              suite: MetricSuite) -> np.ndarray:
    """Entry ``e``'s 8-bit SR image of ``img`` (``restored``: the model's output and its timing row; ``None``
    for a compare folder, read here): save it, measure it, record its image row."""
    row: dict[str, Any] = {"dataset": dataset, "method": e.method, "t": e.t, "name": img.name}
    if e.folder is not None:
        sr = e.folder.load(img.name)
        if sr.shape != img.hq.shape:
            raise ValueError(f"compare {e.method}: {e.folder.paths[img.name]} is {sr.shape[1]}x{sr.shape[0]}, "
                             f"its HQ {img.hq.shape[1]}x{img.hq.shape[0]}")
        row["sr_path"] = e.folder.paths[img.name]
    else:
        sr, timing = restored
        row.update(timing)
    sr = quantize_8bit(sr)
    if e.out is not None:
        path = e.out / f"{img.name}.png"
        write_image(path, sr)
        row["sr_path"] = str(path)
    row.update(suite.image_metrics(sr, img.hq))
    if e.feats is not None:
        e.feats.add(sr)
    e.images.append(row)
    return sr


def _restore_chunk(chunk: Sequence[tuple[int, EvalImage, np.ndarray]], entries: Sequence[_Entry],
                   restorer: Restorer | None, timer: _Timer) -> dict[tuple[int, int], tuple[np.ndarray, dict]]:
    """The model's SR images of a chunk of ``(index, image, upscaled LQ)`` for every model entry, same-size
    images restored in one call (what several devices split): ``{(entry, index): (sr, timing row)}``."""
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, _, up in chunk:
        by_shape.setdefault(up.shape, []).append((i, up))
    out = {}
    for k, e in enumerate(entries):
        if e.folder is not None:
            continue
        for items in by_shape.values():
            srs, timings = timer.call(restorer, np.stack([up for _, up in items]), e.opts)
            for (i, _), sr, timing in zip(items, srs, timings):
                out[(k, i)] = (sr, timing)
    return out


def _summary(dataset: str, e: _Entry, keys: Sequence[str], real: np.ndarray | None) -> dict:
    """The table row of entry ``e``: NaN-ignoring means (NaN counts in ``notes``), FID, seconds per image."""
    row = {"dataset": dataset, "method": e.method, "t": e.t, "label": e.label, "n": len(e.images)}
    notes = {}
    for key in keys:
        if key == "fid":
            row["fid"], why = fid_from_features(real, e.feats.features())
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
             suite: MetricSuite, t_values: Sequence[float] | None = None, sweep_knob: str = "t",
             options: RestoreOptions = RestoreOptions(), label: str | None = None,
             compare: Sequence[tuple[str, str]] = (), upscale: float = 4.0, save_images: bool = True,
             num_samples: int = 4, sample_crop: int = 256, progress: bool = True,
             log: Callable[[str], None] | None = None, meta: Mapping[str, Any] | None = None,
             images_per_call: int | None = None) -> dict:
    """Run the model (at each ``t``) and the ``compare`` methods over every dataset and measure them.

    Each LQ ([h, w, 3] in [0, 1]) is upscaled (bicubic) to the HQ's size and restored; the SR image is rounded to
    8 bits (what the saved PNG holds) before it is measured against the HQ.

    Args:
      datasets: the test sets.
      out_dir: where SR images (``<dataset>/<method>/t<t>/<name>.png``), degraded inputs (``<dataset>/LQ``, ``HQ``,
        for HQ-only sets) and sample grids (``samples_<dataset>.png``) go.
      restorer: the model (``None``: only ``compare`` folders are measured).
      suite: the metrics (:func:`jsr.eval.load_metrics`).
      t_values: values of the knob ``sweep_knob`` swept (CTSR's ``t`` by default); ``None`` = one run at
        ``options`` with no swept value in the rows. Each value must be one the restorer honours
        (:func:`jsr.methods.restorer.check_options`). The rows' ``t`` field holds the swept value, whatever the
        knob; ``report["model"]["sweep"]`` names the knob.
      sweep_knob: the knob swept (any method's knob: ``t``, ``lambda_sem``...).
      options: restoration options (tiling, colour fix, knobs); the swept knob is replaced by each value.
      label: the model's name in the tables (default: the restorer's label, its method's table name).
      compare: ``(label, folder)`` pairs of other methods' SR images (``{dataset}`` in the folder is replaced),
        matched to the dataset's keys or LQ file names; listed before the model, as the paper lists baselines.
      upscale: output size / LQ size; every HQ must be the upscaled LQ's size.
      num_samples, sample_crop: images per sample grid and the crop side in output pixels (0 images: no grid).
      progress: tqdm bars on stderr. log: message sink (stderr by default).
      meta: extra facts recorded under ``"config"`` in the report (the command line's flags).
      images_per_call: consecutive images restored together where they have one size (default: one per device
        of the restorer, :attr:`Restorer.devices`, so that several devices share the work; the rows' ``seconds``
        are each image's share of its call). On one device per image the outputs equal a one-device run's bit
        for bit (the per-device programs are the one-device program).
    Returns:
      the report (JSON-ready dict): ``rows`` (one per dataset x method x t, with means), ``images`` (one per image
      x method x t), ``columns``, ``skipped_metrics``, ``metric_weights`` (where each metric's weight files came
      from: :attr:`MetricSuite.weights`), ``timing``, ``config``; write it with
      :func:`jsr.eval.write_outputs`.
    Raises:
      ValueError before any restoration for bad t values, unmatched compare folders, or an HQ whose size is not
      the upscaled LQ's (:func:`jsr.eval.check_inputs`).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    out = Path(out_dir)
    if restorer is None and not compare:
        raise ValueError("nothing to evaluate: give a restorer and/or compare folders")
    model_label = label or ((restorer.label or restorer.method) if restorer else "")
    runs: list[tuple[float | None, RestoreOptions]] = []
    if restorer is not None:
        sweep = [None] if t_values is None else list(dict.fromkeys(float(t) for t in t_values))
        if not sweep:
            raise ValueError("t_values is empty")
        for t in sweep:
            opts = options if t is None else options.with_knobs(**{sweep_knob: t})
            check_options(restorer, opts)  # the range and that the restorer honours the knob
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
    devices = restorer.devices if restorer is not None else 1
    per_call = max(1, int(images_per_call or devices))

    for ds in datasets:
        ds_dir = out / _slug(ds.name)
        entries = [_Entry(f.label, None, f, None, None, suite) for f in matched[ds.name]]
        for t, opts in runs:
            sub = ds_dir / _slug(model_label) / ("" if t is None else f"{sweep_knob}{t_label(t)}")
            entries.append(_Entry(model_label, t, None, opts, sub if save_images else None, suite, sweep_knob))
        hq_feats = suite.feature_buffer()
        samples: list[tuple[str, list[np.ndarray]]] = []
        bar = tqdm(total=len(ds), desc=ds.name, unit="img", disable=not progress, file=sys.stderr)
        for first in range(0, len(ds), per_call):
            chunk = []
            for i in range(first, min(first + per_call, len(ds))):
                img = ds[i]
                up = upscale_bicubic(img.lq, upscale)
                if up.shape != img.hq.shape:  # check_inputs read the headers; the decoded images must agree
                    raise ValueError(f"dataset {ds.name}: {img.name}: LQ x{upscale:g} is {up.shape[1]}x"
                                     f"{up.shape[0]}, its HQ {img.hq.shape[1]}x{img.hq.shape[0]}")
                if not ds.spec.paired and save_images:
                    write_image(ds_dir / "LQ" / f"{img.name}.png", img.lq)
                    write_image(ds_dir / "HQ" / f"{img.name}.png", img.hq)
                if hq_feats is not None:
                    hq_feats.add(img.hq)
                chunk.append((i, img, up))
            restored = _restore_chunk(chunk, entries, restorer, timer)
            for i, img, up in chunk:
                srs = [_sr_image(ds.name, e, img, restored.get((k, i)), suite) for k, e in enumerate(entries)]
                if i < num_samples:
                    lq_big = Image.fromarray(np.round(img.lq * 255).astype(np.uint8)).resize(
                        (up.shape[1], up.shape[0]), Image.NEAREST)  # LQ pixels as they are, at the output size
                    samples.append((img.name, [np.asarray(lq_big, np.float32) / 255.0] + srs + [img.hq]))
                bar.update(1)
        bar.close()
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
                  "sweep": None if t_values is None else sweep_knob,
                  "options": dataclasses.asdict(options)},
        "columns": [c._asdict() | {"header": c.header} for c in COLUMNS if c.key in metric_keys],
        "skipped_metrics": suite.skipped_reasons(),
        "metric_weights": suite.weights,
        "crop_border": suite.crop_border,
        "fid_dims": suite.fid_dims if suite.inception is not None else None,
        "timing": {"first_call_seconds": timer.first,
                   "seconds_per_image": float(np.mean(timer.warm)) if timer.warm else None,
                   "timed_calls": len(timer.warm), "backend": jax.default_backend(),
                   "device": str(jax.devices()[0].device_kind), "devices": devices, "images_per_call": per_call,
                   "note": "restorer calls only, each call's seconds shared by its images (up to images_per_call "
                           "same-size images, split over the devices); calls at a new input size include "
                           "compilation and are left out of seconds_per_image (timed_calls counts the images "
                           "timed); first_call_seconds is the very first call"},
        "samples": sample_files,
        "rows": rows,
        "images": image_rows,
    }
