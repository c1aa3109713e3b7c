"""The papers' test sets as TFDS datasets (manual download): RealSR (100 pairs), DRealSR (93 pairs) and DIV2K-val
512 crops degraded with a fixed seed (100), at the 128 -> 512 protocol.

    python -m jsr.data.testsets build realsr "/data/RealSR(V3)" --data_dir /data/tfds     # once per set
    python evaluate.py --dataset=tfds:realsr --tfds_data_dir=/data/tfds ...

Modules: :mod:`~jsr.data.testsets.layout` (where each set's files lie in its own download),
:mod:`~jsr.data.testsets.protocol` (the crops and the seeded degradation, shared with the folder form of
:mod:`jsr.eval.datasets`), :mod:`~jsr.data.testsets.builders` (the TFDS builders; it imports
``tensorflow_datasets``, an optional dependency: ``pip install 'jsr[tfds]'``). This module imports TFDS only
when a function here needs it. No TensorFlow is needed to build or read the sets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# name -> (label in the tables, images in the papers' set); the builders are in .builders
TEST_SETS: dict[str, tuple[str, int]] = {"realsr": ("RealSR", 100), "drealsr": ("DRealSR", 93),
                                         "div2k_val": ("DIV2K-Val", 100)}
SPLIT = "test"


def _tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("the TFDS test sets need tensorflow_datasets and array_record (pip install "
                          "'jsr[tfds]')") from e
    return tfds


def register() -> None:
    """Import the builders, which registers ``realsr``, ``drealsr`` and ``div2k_val`` with TFDS."""
    _tfds()
    from jsr.data.testsets import builders  # noqa: F401 - registers on import


def build(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """Prepare test set ``name`` (ArrayRecord files) from its manual download in ``manual_dir`` into
    ``data_dir`` (TFDS's default when None); a set already prepared there is left as it is. Returns the
    prepared dataset's folder.

    Raises:
      ValueError: an unknown name. FileNotFoundError / ValueError: a manual folder not in the set's layout
        (:mod:`jsr.data.testsets.layout`).
    """
    if name not in TEST_SETS:
        raise ValueError(f"unknown test set {name!r}; the sets are {', '.join(TEST_SETS)}")
    tfds = _tfds()
    register()
    from jsr.data.testsets.builders import BUILDERS

    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"{name}: manual folder {str(manual_dir)!r} does not exist "
                                f"({BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS})")
    builder = BUILDERS[name](data_dir=None if data_dir is None else str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return Path(str(builder.data_dir))


def open_split(name: str, data_dir: str | os.PathLike | None = None, split: str = SPLIT,
               decode: bool = False) -> Any:
    """A prepared dataset's split as a random-access sequence of ``{"lq", "hq", "name"}`` dicts
    (``tfds.data_source``; ``name`` comes as bytes). With ``decode=False`` the images stay PNG bytes (decode them
    with :func:`jsr.data.images.decode_image`), so reading every name costs no decoding. Works for any prepared
    TFDS dataset with these three features, not only jsr's.

    Raises FileNotFoundError naming the dataset and folder (and, for jsr's sets, the command that prepares it)
    when it is not prepared there."""
    tfds = _tfds()
    register()
    hint = (f"; prepare it with: python -m jsr.data.testsets build {name} MANUAL_DIR"
            + (f" --data_dir {data_dir}" if data_dir else "")) if name in TEST_SETS else ""
    if data_dir is not None and not (Path(data_dir) / name.split("/")[0]).is_dir():  # TFDS's own message misleads
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {str(data_dir)!r} (no "
                                f"{name.split('/')[0]}/ folder there){hint}")
    decoders = None if decode else {"lq": tfds.decode.SkipDecoding(), "hq": tfds.decode.SkipDecoding()}
    try:
        return tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir),
                                download=False, decoders=decoders)
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted types for a missing dataset; re-raised named
        raise FileNotFoundError(f"TFDS dataset {name!r} (split {split!r}) could not be opened in "
                           f"{data_dir or 'the default TFDS data_dir'}: {' '.join(str(e).split())[:300]}{hint}") \
            from e
