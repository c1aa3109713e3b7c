"""Metric writers and periodic actions for the training loop.

:func:`create_writer` returns CLU's default writer (``clu.metric_writers``: the log plus TensorBoard summaries
through ``tf.summary``) whenever it imports, which needs TensorFlow and the tensorboard package (``pip install
'jsr[tf]'``; CI installs it). TensorFlow is not a core jsr dependency (1.3 GB), so without it :func:`create_writer`
returns :class:`Writer`, which has the same methods (``write_scalars``, ``write_images``, ``write_hparams``,
``write_texts``, ``flush``, ``close``) and writes TensorBoard event files through ``tensorboardX`` plus a line per
write to the log. Both record the training previews as image summaries: CLU one image per batch element, Writer
the batch tiled in a row. Only process 0 writes; TensorFlow is kept off the accelerators (it only writes files).

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


def _import_metric_writers() -> Any:
    # TensorFlow's C++ start-up lines (CPU features, oneDNN) would land in the middle of jsr's console output;
    # its warnings and errors still print. A user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from clu import metric_writers  # imports tensorflow and tensorboard

    return metric_writers


def _clu_writer(logdir: str) -> Any | None:
    """CLU's default writer, or None (the reason logged) when ``clu.metric_writers`` does not import: TensorFlow
    or tensorboard missing, or a TensorFlow build that fails to load beside this numpy/protobuf."""
    try:
        metric_writers = _import_metric_writers()
    except Exception as e:  # noqa: BLE001 - any failure to import means: use the fallback, and say why
        logging.info("CLU metric writers unavailable (%s: %s); writing TensorBoard files with tensorboardX",
                     type(e).__name__, " ".join(str(e).split())[:200])
        return None
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # a GPU build would otherwise reserve device memory JAX needs
    except RuntimeError:  # TensorFlow's devices were already set up by the caller: leave them
        pass

    class LogLines(metric_writers.LoggingWriter):
        """CLU's log writer, but the hyper-parameters get one line, as :class:`Writer` gives them: the values are
        in the workdir's config.json and TensorBoard's hparams, not a hundred-value console line."""

        def write_hparams(self, hparams: Mapping[str, Any]) -> None:
            logging.info("hyper-parameters: %d values (TensorBoard hparams)", len(hparams))

    # create_default_writer's composition (log + TF summaries, asynchronous), with the log writer above
    parts = [LogLines()] + ([metric_writers.SummaryWriter(logdir)] if jax.process_index() == 0 else [])
    return metric_writers.AsyncMultiWriter(parts)


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
    """CLU's default writer when ``clu.metric_writers`` imports (and ``prefer_clu``), else :class:`Writer`; both
    write TensorBoard event files into ``logdir``."""
    if prefer_clu:
        w = _clu_writer(str(logdir))
        if w is not None:
            return w
    return Writer(logdir)


class BackgroundWriter:
    """:func:`create_writer` run in a thread, with ``hparams`` written first: importing CLU's writer pulls in
    TensorFlow (7.5 s of a 55 s warm start of the README's first command on the 2-core CPU, 2026-11-30), which
    then overlaps the train step's compile or cache read instead of preceding it. Every other attribute waits
    for the writer and is the writer's (an error creating it is raised there)."""

    def __init__(self, logdir: str | os.PathLike, hparams: Mapping[str, Any] | None = None, **kwargs: Any):
        import concurrent.futures

        def make() -> Any:
            w = create_writer(logdir, **kwargs)
            if hparams is not None:
                w.write_hparams(hparams)
            return w

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jsr-writer")
        self._future = pool.submit(make)
        pool.shutdown(wait=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future.result(), name)


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
