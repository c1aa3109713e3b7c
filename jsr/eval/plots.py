"""Figures of an evaluation: the fidelity-vs-realism plot (PSNR against LPIPS/DISTS along ``t``), its fallback
when no realism metric was computed (each fidelity metric against ``t``) and the sample grids of centre crops
(LQ | each method/t | HQ)."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jsr.eval.columns import COLUMN, report_columns, t_label


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
      gap: white pixels between tiles.
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


_REALISM = ("lpips", "dists")
_REALISM_FALLBACK = ("fid", "niqe", "musiq", "maniqa", "clipiqa")


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _plot_axes(report: Mapping) -> tuple[list[str], list[dict], str | None]:
    """``(x-axis metrics, rows with a finite PSNR, None)``, or ``([], [], why no plot can be drawn)``."""
    keys = [c.key for c in report_columns(report)]
    xs = [k for k in _REALISM if k in keys] or [k for k in _REALISM_FALLBACK if k in keys][:1]
    if not xs:
        skipped = report.get("skipped_metrics") or {}
        why = "; ".join(f"{COLUMN[k].title}: {skipped[k]}" for k in _REALISM if k in skipped)
        return [], [], ("no realism metric was computed (LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA or CLIPIQA)"
                        + (f" ({why})" if why else ""))
    rows = [r for r in report["rows"] if _finite(r.get("psnr"))]
    if not rows:
        return [], [], "no finite PSNR in any row"
    if not any(_finite(r.get(x)) for r in rows for x in xs):
        return [], [], f"no finite {' or '.join(COLUMN[x].title for x in xs)} value in any row"
    return xs, rows, None


def _absolute_ticks(ax) -> None:
    # No offset or scientific-notation text: with a sweep's close values matplotlib would write "+1.496e1" in the
    # corner, over the title, and ticks of 0.005-0.009.
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)


def plot_missing_reason(report: Mapping) -> str | None:
    """Why :func:`plot_fidelity_realism` draws nothing for ``report`` (``None``: it draws the plot)."""
    return _plot_axes(report)[2]


def _new_figure(panels: int, width: float, height: float):
    """A matplotlib ``Figure`` on an Agg canvas (no display needed), ``panels`` side by side of ``width`` x
    ``height`` inches each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def fidelity_realism_figure(report: Mapping):
    """The fidelity-vs-realism figure (a matplotlib ``Figure``, Agg canvas) of :func:`plot_fidelity_realism`.

    Tick labels are absolute values (no offset or scientific-notation text: with the close values of a sweep,
    matplotlib's default would write "+1.496e1" in the corner, over the title, and ticks of 0.005-0.009), and
    each point of the sweep carries its ``t`` on a white box, alternately above and below the line so that
    neighbours do not print over each other.

    Raises:
      ValueError: nothing to plot (the message is :func:`plot_missing_reason`).
    """
    xs, rows, why = _plot_axes(report)
    if why:
        raise ValueError(why)
    fig = _new_figure(len(xs), 5.6, 4.4)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    colours = [f"C{i % 10}" for i in range(len(datasets))]
    knob = report["model"].get("sweep") or "t"
    for k, x in enumerate(xs):
        ax = fig.add_subplot(1, len(xs), k + 1)
        col = COLUMN[x]
        for ds, colour in zip(datasets, colours):
            mine = [r for r in rows if r["dataset"] == ds and _finite(r.get(x))]
            sweep = [r for r in mine if r["t"] is not None]
            if sweep:
                ax.plot([r[x] for r in sweep], [r["psnr"] for r in sweep], "o-", color=colour,
                        label=f"{ds}: {sweep[0]['method']} ({knob})")
                for i, r in enumerate(sweep):
                    ax.annotate(f"{knob}={t_label(r['t'])}", (r[x], r["psnr"]), textcoords="offset points",
                                xytext=(6, 7 if i % 2 == 0 else -13), fontsize=8, color=colour,
                                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            for j, r in enumerate(r for r in mine if r["t"] is None):
                ax.plot([r[x]], [r["psnr"]], "sD^v<>"[j % 6], color=colour, label=f"{ds}: {r['method']}")
        _absolute_ticks(ax)
        ax.margins(0.12)  # room for the t labels at the ends of the sweep
        ax.set_xlabel(f"{col.title} ({'higher' if col.higher_better else 'lower'} is better)")
        ax.set_ylabel("PSNR (dB, Y)")
        ax.set_title(f"Fidelity vs realism: PSNR vs {col.title}")
        if not col.higher_better:
            ax.invert_xaxis()  # better realism to the right, better fidelity up
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_fidelity_realism(report: Mapping, path: str | os.PathLike) -> list[str]:
    """PSNR (fidelity, up) against LPIPS and DISTS (realism) for every dataset: the swept model as a line through
    its t values (each labelled), compare methods as single points. The x axis runs from worse to better (a
    distance's axis is inverted), so better realism is to the right. Falls back to the first other perceptual
    metric computed when neither LPIPS nor DISTS is. Returns the x-axis metrics plotted (empty: nothing to plot,
    no file written; :func:`plot_missing_reason` says why)."""
    xs, _, why = _plot_axes(report)
    if why:
        return []
    fidelity_realism_figure(report).savefig(path)
    return xs


_FIDELITY = ("psnr", "ssim")


def _t_axes(report: Mapping) -> tuple[list[str], list[dict], str | None]:
    """``(fidelity metrics, the swept rows, None)``, or ``([], [], why no fidelity-vs-t plot can be drawn)``."""
    keys = [c.key for c in report_columns(report)]
    ys = [k for k in _FIDELITY if k in keys]
    sweep = [r for r in report["rows"] if r["t"] is not None]
    if not ys:
        return [], [], "no fidelity metric (PSNR, SSIM) was computed"
    if not sweep:
        return [], [], "no knob was swept, so there is no t axis"
    ys = [y for y in ys if any(_finite(r.get(y)) for r in sweep)]
    if not ys:
        return [], [], "no finite PSNR or SSIM along the sweep"
    return ys, sweep, None


def plot_t_missing_reason(report: Mapping) -> str | None:
    """Why :func:`plot_fidelity_t` draws nothing for ``report`` (``None``: it draws the plot)."""
    return _t_axes(report)[2]


def fidelity_t_figure(report: Mapping):
    """Each fidelity metric (PSNR, SSIM; higher is better) against the swept knob, one panel per metric, one line
    per dataset; other methods of the same dataset (no knob) as dashed horizontal lines. A matplotlib ``Figure``.

    Raises:
      ValueError: nothing to plot (the message is :func:`plot_t_missing_reason`).
    """
    ys, sweep, why = _t_axes(report)
    if why:
        raise ValueError(why)
    fig = _new_figure(len(ys), 5.0, 4.0)
    datasets = list(dict.fromkeys(r["dataset"] for r in sweep))
    knob = report["model"].get("sweep") or "t"
    for k, y in enumerate(ys):
        ax = fig.add_subplot(1, len(ys), k + 1)
        col = COLUMN[y]
        for i, ds in enumerate(datasets):
            colour = f"C{i % 10}"
            mine = sorted((r for r in sweep if r["dataset"] == ds and _finite(r.get(y))), key=lambda r: r["t"])
            if mine:
                ax.plot([r["t"] for r in mine], [r[y] for r in mine], "o-", color=colour,
                        label=f"{ds}: {mine[0]['method']}")
            others = [r for r in report["rows"] if r["dataset"] == ds and r["t"] is None and _finite(r.get(y))]
            for j, r in enumerate(others):
                ax.axhline(r[y], color=colour, linestyle=("--", ":", "-.")[j % 3], linewidth=1,
                           label=f"{ds}: {r['method']}")
        _absolute_ticks(ax)
        ax.margins(0.08)
        ax.set_xlabel(knob)
        ax.set_ylabel(f"{col.title} ({'dB, ' if y == 'psnr' else ''}Y; higher is better)")
        ax.set_title(f"Fidelity vs {knob}: {col.title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_fidelity_t(report: Mapping, path: str | os.PathLike) -> list[str]:
    """Write :func:`fidelity_t_figure` to ``path``: the plot an evaluation without a realism metric still gets.
    Returns the metrics plotted (empty: nothing to plot, no file written; :func:`plot_t_missing_reason` says
    why)."""
    ys, _, why = _t_axes(report)
    if why:
        return []
    fidelity_t_figure(report).savefig(path)
    return ys
