"""An evaluation report on disk: ``results.md``, ``results.csv``, ``results.json`` and ``fidelity_realism.png``
(or its fallback ``fidelity_t.png``) (:func:`write_outputs`), and the JSON read back (:func:`load_report`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jsr.eval.plots import plot_fidelity_realism, plot_fidelity_t, plot_missing_reason, plot_t_missing_reason
from jsr.eval.tables import csv_table, markdown_tables


def _json_ready(x: Any) -> Any:
    """``x`` with NaN/inf floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating, np.integer)):
        return _json_ready(x.item())
    if isinstance(x, Mapping):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_outputs(report: Mapping, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``fidelity_realism.png`` (when there is
    something to plot; otherwise an earlier run's plot there is removed, why there is none goes into the report
    as ``plot_missing`` and into ``results.md``, and each fidelity metric is plotted against the swept knob in
    ``fidelity_t.png`` instead: ``plot_t``, ``plot_t_metrics``) into ``out_dir``; returns ``{kind: path}``
    (kinds ``markdown``, ``csv``, ``json``, ``plot`` or ``plot_t``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "plot": out / "fidelity_realism.png", "plot_t": out / "fidelity_t.png"}
    report = _json_ready(dict(report))
    for key in ("plot_missing", "plot_t", "plot_t_metrics", "plot_t_missing"):
        report.pop(key, None)
    if plot_fidelity_realism(report, files["plot"]):
        report["plot"] = str(files["plot"])
        files.pop("plot_t").unlink(missing_ok=True)  # an earlier run's fallback would contradict this plot
    else:
        files.pop("plot").unlink(missing_ok=True)  # not one left by an earlier run into this folder
        report["plot"] = None
        report["plot_missing"] = plot_missing_reason(report)  # said in results.md, not left to guesswork
        drawn = plot_fidelity_t(report, files["plot_t"])
        if drawn:
            report["plot_t"], report["plot_t_metrics"] = str(files["plot_t"]), drawn
        else:
            files.pop("plot_t").unlink(missing_ok=True)
            report["plot_t_missing"] = plot_t_missing_reason(report)
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
