"""Benchmark evaluation of a one-step SR model: datasets, the control-``t`` sweep, metrics, tables, plot, samples.

    import jsr.eval as ev
    ds = [ev.EvalDataset(ev.parse_dataset("RealSR:lq=RealSR/LR,hq=RealSR/HR"))]
    suite = ev.load_metrics(lpips=["vgg16-397923af.pth", "lpips_vgg.pth"], inception="pt_inception-....pth")
    report = ev.evaluate(ds, "results/ctsr", restorer=load_restorer(...), t_values=[0, 0.5, 1], suite=suite)
    ev.write_outputs(report, "results/ctsr")   # results.md / .csv / .json, fidelity_realism.png

(``evaluate.py`` at the repository root is the command line.) This package sits above :mod:`jsr.sr` (the
restorer), :mod:`jsr.data` (images, degradation) and :mod:`jsr.metrics`, and below ``evaluate.py``. Its modules:

- :mod:`jsr.eval.datasets`: test sets, other methods' SR folders, the input checks;
- :mod:`jsr.eval.suite`: the metrics computed and their weights, per-image scores, FID from features;
- :mod:`jsr.eval.run`: :func:`evaluate`, the sweep over datasets, methods and ``t``, timing;
- :mod:`jsr.eval.columns`: the metric columns (paper order, arrows, decimals) and ``t`` labels;
- :mod:`jsr.eval.tables`: Markdown and CSV tables; :mod:`jsr.eval.plots`: the fidelity-vs-realism plot and the
  sample grids; :mod:`jsr.eval.outputs`: the files on disk and the JSON read back.

**Datasets** (:func:`parse_dataset`): paired LQ/HQ folders matched by file stem (RealSR and DRealSR as the papers
use them, 128 -> 512), or an HQ folder whose images are (optionally centre-cropped and) degraded on the fly with
the Real-ESRGAN pipeline (:func:`jsr.data.degradation.degrade`), each image from its own generator seeded by
``(seed, crc32(name))``: the same LQ on every run and machine, whatever other files the folder holds (DIV2K-val
512 crops), or a prepared TFDS dataset (``tfds:realsr``, ``tfds:drealsr``, ``tfds:div2k_val``:
:mod:`jsr.data.testsets`; :func:`jsr.eval.datasets.open_dataset` opens either form). The degraded LQ and the cropped HQ are written out, so other methods can be run on the same inputs and
compared with ``compare``.

**Protocol.** Each LQ is upscaled (bicubic, ``upscale``) and restored (:class:`jsr.sr.infer.Restorer`, any size);
the SR image is rounded to 8 bits (what the saved PNG holds: papers measure files) and compared with the HQ:
PSNR and SSIM on the BT.601 Y channel (``crop_border`` pixels dropped, 0 by default as pyiqa-based evaluations of
OSEDiff/PiSA-SR/CTSR), LPIPS-VGG, DISTS, FID between the set of HQ images and the set of SR images (Inception
features of the in-memory 8-bit images: exactly ``fid_from_folders(HQ folder, SR folder)`` when the HQ folder holds
the dataset's images), NIQE, and MUSIQ / MANIQA-PIPAL / CLIPIQA through pyiqa. A metric whose weights are not given
is looked for where the PyTorch packages keep it (:mod:`jsr.metrics.files`) and skipped when it is not there
(the reason recorded); PSNR/SSIM always run. NIQE is NaN for an image with fewer than two usable
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

from jsr.eval.columns import COLUMN, COLUMNS, Column, t_label
from jsr.eval.datasets import (DATASET_HELP, DatasetSpec, EvalDataset, EvalImage, SRFolder, check_inputs,
                               parse_compare, parse_dataset)
from jsr.eval.outputs import load_report, write_outputs
from jsr.eval.plots import plot_fidelity_realism, sample_grid
from jsr.eval.run import evaluate
from jsr.eval.suite import PYIQA_METRICS, MetricSuite, load_metrics, weights_summary
from jsr.eval.tables import csv_table, markdown_tables

__all__ = [
    "COLUMN", "COLUMNS", "Column", "t_label",
    "DATASET_HELP", "DatasetSpec", "EvalDataset", "EvalImage", "SRFolder", "check_inputs", "parse_compare",
    "parse_dataset",
    "load_report", "write_outputs",
    "plot_fidelity_realism", "sample_grid",
    "evaluate",
    "PYIQA_METRICS", "MetricSuite", "load_metrics", "weights_summary",
    "csv_table", "markdown_tables",
]
