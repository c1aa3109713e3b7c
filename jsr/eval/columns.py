"""The metric columns of the evaluation tables (the CTSR paper's order, arrows, decimals) and the ``t`` labels,
shared by the run, the tables and the plot."""

from __future__ import annotations

from typing import Mapping, NamedTuple


class Column(NamedTuple):
    """A metric column: key (JSON/CSV), title (tables), whether higher is better, decimals shown."""

    key: str
    title: str
    higher_better: bool
    decimals: int

    @property
    def header(self) -> str:
        return f"{self.title}{'↑' if self.higher_better else '↓'}"


# The CTSR paper's column order (Tables 2, 3, 10); "CLIQQA" there is CLIPIQA.
COLUMNS = (
    Column("psnr", "PSNR", True, 2), Column("ssim", "SSIM", True, 4), Column("lpips", "LPIPS", False, 4),
    Column("dists", "DISTS", False, 4), Column("fid", "FID", False, 2), Column("niqe", "NIQE", False, 4),
    Column("musiq", "MUSIQ", True, 2), Column("maniqa", "MANIQA", True, 4), Column("clipiqa", "CLIPIQA", True, 4),
)
COLUMN = {c.key: c for c in COLUMNS}


def report_columns(report: Mapping) -> list[Column]:
    """The columns a report (:func:`jsr.eval.evaluate`) computed, in table order."""
    return [COLUMN[c["key"]] for c in report["columns"]]


def t_label(t: float | None) -> str:
    """``0.2`` -> ``"0.2"``, ``1`` -> ``"1.0"`` (the paper's way), ``0.25`` -> ``"0.25"``; any other value in
    full (``repr``), so distinct values never share a label (or an output folder); ``None`` -> ``""``."""
    return "" if t is None else f"{t:.1f}" if round(t, 1) == t else repr(float(t))
