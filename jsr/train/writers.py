"""Metric writers and periodic actions for the training loop.

CLU's writers (``clu.metric_writers``) import TensorFlow at package import time (clu 0.0.12), and TensorFlow is
not a jsr dependency (hundreds of MB, and its numpy/ml_dtypes pins fight JAX's). So: when TensorFlow is importable,
:func:`create_writer` returns CLU's own default writer; otherwise it returns :class:`Writer`, which has the same
methods (``write_scalars``, ``write_images``, ``write_hparams``, ``write_texts``, ``flush``, ``close``) and writes
TensorBoard event files through ``tensorboardX`` plus a line per write to the log. Only process 0 writes.

:class:`ProgressReporter` is the periodic "steps/s and ETA" line (CLU's ``ReportProgress`` role) and
:class:`Profiler` captures a ``jax.profiler`` trace of a few steps.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def _clu_writer(logdir: str) -> Any | None:
    try:
        from clu import metric_writers  # imports tensorflow
    except ImportError:
        return None
    return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)


class Writer:
    """TensorBoard (tensorboardX) + log writer with CLU's ``MetricWriter`` methods.

    Images are NHWC (or HWC) floats in [0, 1] or uint8.
    """

    def __init__(self, logdir: str | os.PathLike, *, tensorboard: bool = True):
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log ``{name: scalar}`` at ``step``."""
        if jax.process_index() > 0:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Log ``{name: image}`` (HWC or NHWC; NHWC batches are tiled in a row)."""
        if self._tb is None:
            return
        for k, img in images.items():
            img = np.asarray(img)
            if img.ndim == 4:
                img = np.concatenate(list(img), axis=1)
            if img.dtype != np.uint8:
                img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
            self._tb.add_image(k, img, step, dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Log ``{name: text}``."""
        if self._tb is not None:
            for k, v in texts.items():
                self._tb.add_text(k, v, step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's hyper-parameters (flattened config) as a text summary. The log gets one line, not the
        hundred-odd values: the training loop writes the whole config to the workdir's ``config.json``."""
        if jax.process_index() > 0:
            return
        text = "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))
        logging.info("hyper-parameters: %d values (TensorBoard text 'hparams')", len(hparams))
        if self._tb is not None:
            self._tb.add_text("hparams", text.replace("\n", "  \n"), 0)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def create_writer(logdir: str | os.PathLike, *, prefer_clu: bool = True) -> Any:
    """CLU's default writer when TensorFlow is present (and ``prefer_clu``), else :class:`Writer`."""
    if prefer_clu:
        w = _clu_writer(str(logdir))
        if w is not None:
            return w
    return Writer(logdir)


class ProgressReporter:
    """Every ``every`` steps, reports steps/s, examples/s and the ETA to ``writer`` and the log."""

    def __init__(self, writer: Any, total_steps: int, every: int = 50, batch_size: int | None = None):
        self.writer = writer
        self.total = total_steps
        self.every = every
        self.batch_size = batch_size
        self._t = None
        self._step = None

    def __call__(self, step: int) -> None:
        now = time.perf_counter()
        if self._t is None:
            self._t, self._step = now, step
            return
        if step % self.every:
            return
        dt, ds = now - self._t, step - self._step
        if ds <= 0 or dt <= 0:
            return
        rate = ds / dt
        eta = (self.total - step) / rate
        values = {"perf/steps_per_sec": rate}
        if self.batch_size:
            values["perf/examples_per_sec"] = rate * self.batch_size
        self.writer.write_scalars(step, values)
        logging.info("step %d/%d: %.3f steps/s, ETA %s", step, self.total, rate, _hms(eta))
        self._t, self._step = now, step


class Profiler:
    """Captures a ``jax.profiler`` trace of ``num_steps`` steps starting at ``first_step`` into ``logdir``."""

    def __init__(self, logdir: str | os.PathLike, first_step: int, num_steps: int = 5, enabled: bool = True):
        self.logdir, self.first, self.last = str(logdir), first_step, first_step + num_steps
        self.enabled = enabled and jax.process_index() == 0
        self._on = False

    def __call__(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.first and not self._on:
            jax.profiler.start_trace(self.logdir)
            self._on = True
        elif step >= self.last and self._on:
            jax.profiler.stop_trace()
            self._on = False
            logging.info("profile of steps %d-%d written to %s", self.first, self.last, self.logdir)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
