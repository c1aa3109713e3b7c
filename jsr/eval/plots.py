"""Figures of an evaluation: the fidelity-vs-realism plot (PSNR against LPIPS/DISTS along ``t``) and the sample
grids of centre crops (LQ | each method/t | HQ)."""

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


def plot_fidelity_realism(report: Mapping, path: str | os.PathLike) -> list[str]:
    """PSNR (fidelity, up) against LPIPS and DISTS (realism) for every dataset: the swept model as a line through
    its t values (each labelled), compare methods as single points. The x axis runs from worse to better (a
    distance's axis is inverted), so better realism is to the right. Falls back to the first other perceptual
    metric computed when neither LPIPS nor DISTS is. Returns the x-axis metrics plotted (empty: nothing to plot,
    no file written)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [c.key for c in report_columns(report)]
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
                        label=f"{ds}: {sweep[0]['method']} ({report['model'].get('sweep') or 't'})")
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
