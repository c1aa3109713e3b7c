"""The fidelity-vs-realism plot (issue 13, bug 5): absolute tick labels with no matplotlib offset text, a label per
t, and when it cannot be drawn, the reason in results.md and results.json."""
import datetime

import pytest

import jsr.eval as ev
from jsr.eval import plots


def _report(metrics=("psnr", "ssim", "lpips"), skipped=None) -> dict:
    """A report as :func:`jsr.eval.evaluate` returns it, with a CTSR-like t sweep whose values differ in the
    third or fourth decimal (what made matplotlib write "+1.496e1" over the title)."""
    rows = []
    for i, t in enumerate((0.0, 0.2, 0.4, 0.6, 0.8, 1.0)):
        row = {"dataset": "RealSR", "method": "CTSR", "label": f"CTSR (t={t})", "t": t, "n": 3,
               "psnr": 14.9602 + 0.0007 * i, "ssim": 0.41 + 0.001 * i, "lpips": 0.1495 + 0.00012 * i}
        rows.append({k: v for k, v in row.items() if k not in ("psnr", "ssim", "lpips") or k in metrics})
    rows.append({"dataset": "RealSR", "method": "Bicubic", "label": "Bicubic", "t": None, "n": 3,
                 **{k: v for k, v in {"psnr": 14.9631, "ssim": 0.4, "lpips": 0.1499}.items() if k in metrics}})
    return {"format": "jsr-evaluation-1", "created": datetime.datetime(2026, 11, 30).isoformat(), "config": {},
            "datasets": [], "model": {"label": "CTSR", "method": "ctsr", "t_values": [], "sweep": "t"},
            "columns": [c._asdict() | {"header": c.header} for c in ev.COLUMNS if c.key in metrics],
            "skipped_metrics": skipped or {}, "crop_border": 0, "fid_dims": None,
            "timing": {"first_call_seconds": None}, "samples": {}, "rows": rows, "images": []}


def test_ticks_are_absolute_and_there_is_no_offset_text():
    fig = plots.fidelity_realism_figure(_report())
    fig.canvas.draw()  # formatters decide their offset only when ticks are drawn
    (ax,) = fig.axes
    for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_offset_text().get_text() == ""
        labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
        assert labels and all("e" not in s and not s.startswith("+") for s in labels), labels
    ys = [float(t.get_text().replace("\u2212", "-")) for t in ax.yaxis.get_ticklabels() if t.get_text()]
    assert all(14.9 < y < 15.0 for y in ys), ys  # absolute PSNR, not the offset-subtracted 0.00x
    xs = [float(t.get_text().replace("\u2212", "-")) for t in ax.xaxis.get_ticklabels() if t.get_text()]
    assert all(0.149 < x < 0.151 for x in xs), xs
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["t=0.0", "t=0.2", "t=0.4", "t=0.6", "t=0.8", "t=1.0"]
    assert all(t.get_fontsize() >= 8 for t in ax.texts)
    assert ax.xaxis_inverted()  # LPIPS: lower is better, so better realism is to the right


def test_a_missing_plot_says_why(tmp_path, capsys):
    report = _report(metrics=("psnr", "ssim"), skipped={"lpips": "no weights given (--lpips)"})
    assert "no realism metric" in plots.plot_missing_reason(report)
    with pytest.raises(ValueError, match="no realism metric"):
        plots.fidelity_realism_figure(report)
    files = ev.write_outputs(report, tmp_path)
    assert "plot" not in files and not (tmp_path / "fidelity_realism.png").exists()
    md = (tmp_path / "results.md").read_text()
    assert "Not drawn (no fidelity_realism.png): no realism metric was computed" in md
    assert "LPIPS: no weights given (--lpips)" in md.split("## Fidelity-vs-realism plot")[1]
    assert ev.load_report(files["json"])["plot_missing"].startswith("no realism metric")
    # With LPIPS the plot is written, and no stale reason is kept.
    files = ev.write_outputs(_report(), tmp_path)
    assert (tmp_path / "fidelity_realism.png").stat().st_size > 0
    assert "plot_missing" not in ev.load_report(files["json"])
    assert "Not drawn" not in (tmp_path / "results.md").read_text()
