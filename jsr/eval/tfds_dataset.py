"""A prepared TFDS dataset as an evaluation test set (``evaluate.py --dataset=tfds:realsr``): the same interface
as :class:`jsr.eval.datasets.EvalDataset`, read through ``tfds.data_source`` (ArrayRecord; no TensorFlow).

The dataset needs ``lq`` and ``hq`` image features and a ``name`` text feature, as jsr's own test sets
(:mod:`jsr.data.testsets`: ``realsr``, ``drealsr``, ``div2k_val``) have. Images are decoded by
:func:`jsr.data.images.decode_image`, the reader of the folder form, so an 8-bit pair gives the same float32
arrays in both forms.
"""

from __future__ import annotations

import collections

import numpy as np

from jsr.data import testsets
from jsr.data.images import decode_image, to_float01
from jsr.eval.datasets import DatasetSpec, EvalImage


class TfdsEvalDataset:
    """The examples of a TFDS :class:`jsr.eval.datasets.DatasetSpec` (``spec.tfds``), sorted by name (as the
    folder form sorts its keys): ``names``, ``lq_paths`` (all ``None``: there are no LQ files), ``hq_paths``
    (``tfds:<name>/<split>/<key>``, for the report), ``scale`` (HQ / LQ size, read from the first example).

    A set at another scale than the evaluation's is refused by :func:`jsr.eval.datasets.check_inputs`, before any
    model runs.

    Args:
      spec: the set (``tfds``, ``split``, ``data_dir``: empty for TFDS's default).
      max_images: keep the first ``max_images`` names (0: all).
    Raises:
      ImportError without tensorflow_datasets; FileNotFoundError for a dataset not prepared there; ValueError for
      one without ``lq``/``hq``/``name`` features, empty, or with duplicate names.
    """

    def __init__(self, spec: DatasetSpec, max_images: int = 0):
        self.spec, self.name = spec, spec.name
        self.data_dir = spec.data_dir or None
        self._source = testsets.open_split(spec.tfds, self.data_dir, spec.split, decode=False)
        n = len(self._source)
        if n == 0:
            raise ValueError(f"dataset {self.name}: TFDS {spec.tfds!r} split {spec.split!r} is empty")
        first = self._source[0]
        missing = {"lq", "hq", "name"} - set(first)
        if missing:
            raise ValueError(f"dataset {self.name}: TFDS {spec.tfds!r} has no {sorted(missing)} feature(s) "
                             f"(it has {sorted(first)})")
        names = [_text(self._source[i]["name"]) for i in range(n)]
        dup = sorted(k for k, c in collections.Counter(names).items() if c > 1)
        if dup:
            raise ValueError(f"dataset {self.name}: TFDS {spec.tfds!r} holds several examples named {dup[:10]}")
        order = sorted(range(n), key=names.__getitem__)
        if max_images:
            order = order[:max_images]
        self._index = order
        self.names = [names[i] for i in order]
        self.lq_paths: list[str | None] = [None] * len(order)
        self.hq_paths = [f"tfds:{spec.tfds}/{spec.split}/{k}" for k in self.names]
        lq, hq = (decode_image(_bytes(first[k]), f"tfds:{spec.tfds}/{spec.split}[0]:{k}") for k in ("lq", "hq"))
        ratio = hq.shape[0] / lq.shape[0]
        self.scale = int(ratio) if ratio == int(ratio) and hq.shape[1] == ratio * lq.shape[1] else ratio

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> EvalImage:
        ex = self._source[self._index[i]]
        where = self.hq_paths[i]
        lq, hq = (to_float01(decode_image(_bytes(ex[k]), f"{where}:{k}")) for k in ("lq", "hq"))
        return EvalImage(self.names[i], lq, hq, None, where)

    def __repr__(self) -> str:
        return f"TfdsEvalDataset({self.name!r}, tfds {self.spec.tfds!r}, {len(self)} images)"


def _bytes(value) -> bytes:
    """An undecoded image feature (bytes, or a NumPy bytes scalar) as bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tobytes()


def _text(value) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
