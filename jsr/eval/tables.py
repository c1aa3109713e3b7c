"""An evaluation report (:func:`jsr.eval.evaluate`) as tables: Markdown in the CTSR paper's layouts (Tables 2/3:
Datasets | Method | metrics; Table 10: Timestep t | metrics) and CSV (one row per dataset x method x t)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from jsr.eval.columns import COLUMN, Column, report_columns, t_label


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
    cols = report_columns(report)
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
        knob = report["model"].get("sweep") or "t"
        lines.append(f"| {'Timestep t' if knob == 't' else knob} | " + " | ".join(c.header for c in cols) + " |")
        lines.append("|---:|" + "---:|" * len(cols))
        ranks = {c.key: _ranks(sweep, c) for c in cols}
        for i, r in enumerate(sweep):
            cells = [_mark(_fmt(r.get(c.key), c.decimals), ranks[c.key].get(i)) for c in cols]
            lines.append(f"| {t_label(r['t'])} | " + " | ".join(cells) + " |")
    tm = report["timing"]
    lines += ["", "## Timing", ""]
    if tm["first_call_seconds"] is not None:
        per = "—" if tm["seconds_per_image"] is None else f"{tm['seconds_per_image']:.3f} s"
        devices = tm.get("devices", 1)
        on = f"{devices} x {tm['device']}" if devices > 1 else tm["device"]
        lines.append(f"Per image (restorer call, compiled): {per} over {tm['timed_calls']} images; first call "
                     f"(with compilation): {tm['first_call_seconds']:.2f} s; device: {on} ({tm['backend']}).")
    else:
        lines.append("No model was run.")
    notes = [f"- {r['dataset']} / {r['label']}: {k}: {v}"
             for r in report["rows"] for k, v in r.get("notes", {}).items()]
    skipped = [f"- {COLUMN[k].title}: {v}" for k, v in report["skipped_metrics"].items()]
    if skipped:
        lines += ["", "## Metrics not computed", ""] + skipped
    if report.get("plot_missing"):
        lines += ["", "## Fidelity-vs-realism plot", "", f"Not drawn (no fidelity_realism.png): "
                  f"{report['plot_missing']}."]
        if report.get("plot_t"):
            knob = report["model"].get("sweep") or "t"
            plotted = " and ".join(COLUMN[k].title for k in report["plot_t_metrics"])
            lines.append(f"Instead, fidelity_t.png plots {plotted} against {knob}.")
        elif report.get("plot_t_missing"):
            lines.append(f"No fidelity-vs-t plot either: {report['plot_t_missing']}.")
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def csv_table(report: Mapping) -> str:
    """One CSV row per dataset x method x swept value (column ``t``: the swept knob's value): ``Datasets, Method, t, N, <metric headers with arrows>,
    seconds/image`` (full precision; empty cells for undefined values)."""
    cols = report_columns(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Datasets", "Method", "t", "N"] + [c.header for c in cols] + ["seconds/image"])
    for r in report["rows"]:
        vals = [r.get(c.key) for c in cols] + [r.get("seconds_per_image")]
        w.writerow([r["dataset"], r["method"], "" if r["t"] is None else repr(r["t"]), r["n"]]
                   + ["" if v is None or not math.isfinite(v) else repr(float(v)) for v in vals])
    return buf.getvalue()
