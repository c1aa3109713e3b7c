"""Where the test images lie in each set's own download (no TensorFlow): the manual folders the TFDS builders
read, as the datasets' authors distribute them.

- **RealSR (V3)** (Cai et al., ICCV 2019; csjcai/RealSR): ``<root>/Canon/Test/4/Canon_001_HR.png`` with
  ``Canon_001_LR4.png`` beside it, the same for ``Nikon``: 50 + 50 pairs, LQ a quarter of the HQ's size.
- **DRealSR** (Wei et al., ECCV 2020; xiezw5/Component-Divide-and-Conquer-for-Real-World-Image-Super-Resolution):
  ``<root>/x4/Test_x4/test_HR/<name>_x4.png`` and ``.../test_LR/<name>_x1.png`` (names such as ``Canon_10``,
  ``Sony_3``): 93 pairs. Unpacked archives often nest a second ``Test_x4`` or ``DRealSR`` folder; any depth is
  accepted.
- **DIV2K-val** (Agustsson and Timofte, CVPRW 2017): ``<root>/DIV2K_valid_HR/0801.png`` ... ``0900.png`` (or
  ``<root>`` being that folder): 100 HQ images.

``<root>`` may also be the folder that holds the set's top folder (``RealSR(V3)/``, ``DRealSR/``); each function
says what it looked for when nothing matches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from jsr.data.images import IMAGE_EXTENSIONS, list_images
from jsr.data.sources import PairedFolderSource

REALSR_CAMERAS = ("Canon", "Nikon")
DREALSR_STRIP = r"_x[14]$"  # DRealSR's x4 test names: <name>_x1 (LQ) / <name>_x4 (HQ)


class PairFiles(NamedTuple):
    """One test image: its key (the file name without the LQ/HQ suffix), the LQ file (``None`` for HQ-only sets)
    and the HQ file."""

    name: str
    lq: str | None
    hq: str


def _preview(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _find_dir(root: Path, relative: str, what: str, layout: str) -> Path:
    """``root/relative`` or ``root/<one folder>/relative``; FileNotFoundError naming the layout when neither is."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: manual folder {str(root)!r} does not exist")
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (base / relative).is_dir():
            return base / relative
    raise FileNotFoundError(f"{what}: no {relative}/ under {str(root)!r} (expected {layout})")


def realsr_pairs(root: str | Path) -> list[PairFiles]:
    """The RealSR (V3) x4 test pairs under ``root``, Canon then Nikon, sorted by name (``Canon_001``).

    Raises FileNotFoundError when a camera's ``Test/4`` folder is missing, ValueError when an HR file has no LR4
    file or the other way round."""
    root = Path(root)
    layout = "RealSR(V3)/{Canon,Nikon}/Test/4/*_HR.png and *_LR4.png"
    pairs: list[PairFiles] = []
    for camera in REALSR_CAMERAS:
        folder = _find_dir(root, f"{camera}/Test/4", "RealSR", layout)
        sides: dict[str, dict[str, str]] = {"HR": {}, "LR4": {}}
        for p in list_images(folder, recursive=False):
            m = re.fullmatch(r"(.+)_(HR|LR4)", p.stem)
            if m:
                sides[m.group(2)][m.group(1)] = str(p)
        hr, lr = sides["HR"], sides["LR4"]
        if not hr:
            raise FileNotFoundError(f"RealSR: no *_HR / *_LR4 images in {str(folder)!r} (expected {layout})")
        only_hr, only_lr = sorted(set(hr) - set(lr)), sorted(set(lr) - set(hr))
        if only_hr or only_lr:
            raise ValueError(f"RealSR: {folder}: {len(only_hr)} HR file(s) without an LR4 file ({_preview(only_hr)}), "
                             f"{len(only_lr)} LR4 without HR ({_preview(only_lr)})")
        pairs += [PairFiles(k, lr[k], hr[k]) for k in sorted(hr)]
    return pairs


def drealsr_pairs(root: str | Path) -> list[PairFiles]:
    """The DRealSR x4 test pairs under ``root`` (``.../Test_x4/test_LR`` and ``test_HR``, at any depth), sorted by
    name (``Canon_10``); paired by :class:`jsr.data.sources.PairedFolderSource` with the ``_x1`` / ``_x4``
    suffixes stripped.

    Raises FileNotFoundError when there is no such folder pair or it is ambiguous, ValueError for unmatched
    files."""
    root = Path(root)
    layout = "DRealSR/x4/Test_x4/test_HR/*_x4.png and test_LR/*_x1.png"
    if not root.is_dir():
        raise FileNotFoundError(f"DRealSR: manual folder {str(root)!r} does not exist")
    candidates = [root, *root.rglob("Test_x4")] if root.name == "Test_x4" else list(root.rglob("Test_x4"))
    found = sorted(d for d in candidates if (d / "test_HR").is_dir() and (d / "test_LR").is_dir())
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(map(str, found))})"
        raise FileNotFoundError(f"DRealSR: {what} Test_x4/ folder(s) holding test_HR/ and test_LR/ under "
                                f"{str(root)!r} (expected {layout})")
    src = PairedFolderSource(found[0] / "test_LR", found[0] / "test_HR", strip=DREALSR_STRIP)
    return [PairFiles(k, lq, hq) for k, lq, hq in zip(src.keys, src.lq_paths, src.hq_paths)]


def div2k_val_images(root: str | Path) -> list[PairFiles]:
    """The DIV2K validation HQ images: ``root/DIV2K_valid_HR/*`` (or ``root`` itself when it holds the images
    directly), sorted by name (``0801``); ``lq`` is ``None`` (the LQ is made by degradation).

    Raises FileNotFoundError when there are no images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DIV2K-val: manual folder {str(root)!r} does not exist")
    folder = root / "DIV2K_valid_HR" if (root / "DIV2K_valid_HR").is_dir() else root
    files = list_images(folder, recursive=False)
    if not files:
        raise FileNotFoundError(f"DIV2K-val: no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r} "
                                "(expected DIV2K_valid_HR/0801.png ... 0900.png)")
    stems = [p.stem for p in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"DIV2K-val: several files in {str(folder)!r} share the name(s) {_preview(dup)}")
    return [PairFiles(p.stem, None, str(p)) for p in files]


# test-set name (as in jsr.data.testsets.TEST_SETS) -> the function listing its files
FIND = {"realsr": realsr_pairs, "drealsr": drealsr_pairs, "div2k_val": div2k_val_images}
