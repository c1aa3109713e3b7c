"""The inputs of an evaluation: test sets (paired LQ/HQ folders, HQ folders degraded on the fly with a fixed
seed, or prepared TFDS datasets such as :mod:`jsr.data.testsets`' ``realsr``), other methods' SR folders matched
to them, and the checks run on both before any model does.

Crops and degradation follow :mod:`jsr.data.testsets.protocol`, which the TFDS builders use too: a folder form
and the TFDS form of a set give the same arrays."""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from jsr.data import degradation as degradation_lib
from jsr.data.sources import IMAGE_EXTENSIONS, PairedFolderSource, list_images, load_image
from jsr.data.testsets import TEST_SETS, protocol


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One test set.

    Attributes:
      name: its name in the tables (``RealSR``).
      hq: the HQ (ground-truth) folder, searched recursively (empty for a TFDS set).
      lq: the LQ folder (paired, matched to HQ by file stem); empty = degrade each HQ image on the fly.
      strip: regular expression removed from every stem before matching (``_(LR\\d*|HR)$`` for names that differ
        by a suffix); also applied to ``compare`` folders.
      seed: degradation seed (HQ-only sets).
      crop: the HQ crop side (0: whole images). HQ-only sets: each HQ image's centre ``crop x crop`` is degraded;
        paired sets: the aligned centre crops, LQ ``crop / scale`` and HQ ``crop`` (``crop=512`` is the papers'
        128 -> 512 protocol on whole RealSR/DRealSR pairs).
      degradation: degradation preset (``realesrgan``, ``pisa``; :mod:`jsr.data.degradation`); HQ-only sets.
      tfds: a prepared TFDS dataset with ``lq``, ``hq`` and ``name`` features (``realsr``, ``drealsr``,
        ``div2k_val``: :mod:`jsr.data.testsets`) instead of folders.
      data_dir: its TFDS data folder (empty: ``evaluate.py --tfds_data_dir``, else TFDS's default).
      split: its split (``test``).
    """

    name: str
    hq: str = ""
    lq: str = ""
    strip: str = ""
    seed: int = 0
    crop: int = 0
    degradation: str = "realesrgan"
    tfds: str = ""
    data_dir: str = ""
    split: str = "test"

    @property
    def paired(self) -> bool:
        """Pairs that exist (folders or TFDS), as opposed to HQ images degraded on the fly."""
        return bool(self.lq or self.tfds)


_FOLDER_KEYS = {"hq", "lq", "strip", "seed", "crop", "degradation"}
_TFDS_KEYS = {"data_dir", "split", "label"}
DATASET_HELP = ("NAME:hq=DIR[,lq=DIR][,strip=REGEX][,seed=N][,crop=N][,degradation=PRESET] or "
                "tfds:TFDS_NAME[,data_dir=DIR][,split=SPLIT][,label=NAME]; with lq the folders are paired by file "
                "stem (crop=512: the aligned 128/512 centre crops), without it the HQ images are degraded on the "
                "fly; tfds: a prepared TFDS dataset (realsr, drealsr, div2k_val: python -m jsr.data.testsets) "
                "(values may not contain commas)")


def _items(name: str, rest: str, keys: set[str]) -> dict[str, str]:
    kw: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in keys:
            raise ValueError(f"dataset {name}: bad item {item!r}; keys are {sorted(keys)}")
        if key in kw:
            raise ValueError(f"dataset {name}: {key} given twice")
        kw[key] = value.strip()
    return kw


def _parse_tfds(rest: str) -> DatasetSpec:
    tfds_name, _, rest = rest.partition(",")
    tfds_name = tfds_name.strip()
    if not tfds_name or "=" in tfds_name:
        raise ValueError(f"dataset tfds:{tfds_name}: want {DATASET_HELP}")
    kw = _items(tfds_name, rest, _TFDS_KEYS)
    label = kw.pop("label", "") or TEST_SETS.get(tfds_name, (tfds_name,))[0]
    return DatasetSpec(name=label, tfds=tfds_name, **kw)


def parse_dataset(text: str) -> DatasetSpec:
    """A :class:`DatasetSpec` from ``NAME:key=value,...`` or ``tfds:TFDS_NAME,key=value,...`` (see
    ``DATASET_HELP``), e.g. ``RealSR:lq=/data/RealSR/test_LR,hq=/data/RealSR/test_HR``,
    ``DIV2K-Val:hq=/data/DIV2K_val,crop=512,seed=0`` or ``tfds:realsr,data_dir=/data/tfds`` (named ``RealSR`` in
    the tables; ``label=`` renames it). Raises ValueError naming the problem."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or "/" in name:
        raise ValueError(f"dataset {text!r}: want {DATASET_HELP}")
    if name == "tfds":
        return _parse_tfds(rest)
    kw: dict[str, Any] = _items(name, rest, _FOLDER_KEYS)
    if not kw.get("hq"):
        raise ValueError(f"dataset {name}: hq=<folder> is required ({DATASET_HELP})")
    for key in ("seed", "crop"):
        if key in kw:
            try:
                kw[key] = int(kw[key])
            except ValueError:
                raise ValueError(f"dataset {name}: {key} must be an integer, got {kw[key]!r}") from None
    if kw.get("crop", 0) < 0:
        raise ValueError(f"dataset {name}: crop must be >= 0")
    if kw.get("lq") and ("degradation" in kw or "seed" in kw):
        raise ValueError(f"dataset {name}: seed/degradation apply to HQ-only (degraded) sets, not to paired "
                         "folders")
    if kw.get("strip"):
        try:
            re.compile(kw["strip"])
        except re.error as e:
            raise ValueError(f"dataset {name}: strip={kw['strip']!r} is not a regular expression ({e})") from None
    return DatasetSpec(name=name, **kw)


class EvalImage(NamedTuple):
    """One test image: its key (relative stem), LQ [h, w, 3] and HQ [H, W, 3] float32 in [0, 1], source paths."""

    name: str
    lq: np.ndarray
    hq: np.ndarray
    lq_path: str | None
    hq_path: str


class EvalDataset:
    """The images of a folder :class:`DatasetSpec`, in sorted key order (random access, read on demand): ``names``
    (keys), ``lq_paths`` (``None`` entries for degraded sets), ``hq_paths``. (TFDS specs:
    :class:`jsr.eval.tfds_dataset.TfdsEvalDataset`; :func:`open_dataset` picks.)

    Paired sets with ``spec.crop``: the aligned centre crops of :func:`jsr.data.testsets.protocol.crop_pair`.
    HQ-only sets: each HQ image is centre-cropped (``spec.crop``), cut to a multiple of ``scale`` and degraded
    (:func:`jsr.data.degradation.degrade`) with its own generator seeded by ``(spec.seed, crc32(name))``: the same
    LQ on every run and machine, whatever other files the folder holds
    (:func:`jsr.data.testsets.protocol.degraded_pair`).

    Args:
      spec: the set.
      scale: output size / LQ size (4): degradation scale of HQ-only sets.
      max_images: keep the first ``max_images`` keys (0: all).
    Raises:
      FileNotFoundError for a missing folder or one without images; ValueError for unmatched or duplicate pairs.
    """

    def __init__(self, spec: DatasetSpec, scale: int = 4, max_images: int = 0):
        if spec.tfds:
            raise ValueError(f"dataset {spec.name}: a TFDS set; open it with open_dataset")
        self.spec = spec
        self.name = spec.name
        for side, folder in (("HQ", spec.hq), ("LQ", spec.lq)):
            if folder and not Path(folder).is_dir():
                raise FileNotFoundError(f"dataset {spec.name}: {side} folder {folder!r} does not exist")
        if spec.paired:
            src = PairedFolderSource(spec.lq, spec.hq, strip=spec.strip)
            keys, self.lq_paths, self.hq_paths = list(src.keys), list(src.lq_paths), list(src.hq_paths)
        else:
            files = list_images(spec.hq)
            if not files:
                raise FileNotFoundError(f"dataset {spec.name}: HQ folder {spec.hq!r} holds no images "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
            root = Path(spec.hq)
            keys = [_key(p, root, spec.strip) for p in files]
            dup = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
            if dup:
                raise ValueError(f"dataset {spec.name}: several HQ files map to the name(s) {dup[:10]}")
            self.lq_paths, self.hq_paths = [None] * len(keys), [str(p) for p in files]
            self._degradation = degradation_lib.resolve_config(spec.degradation)
            if self._degradation.scale != scale:
                raise ValueError(f"dataset {spec.name}: the {spec.degradation!r} degradation has scale "
                                 f"{self._degradation.scale}, the evaluation upscales by {scale}")
        if max_images:
            keys = keys[:max_images]
            self.lq_paths, self.hq_paths = self.lq_paths[:max_images], self.hq_paths[:max_images]
        self.names = keys
        self.scale = scale

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> EvalImage:
        name, hq = self.names[i], load_image(self.hq_paths[i])
        if self.spec.paired:
            lq = load_image(self.lq_paths[i])
            if self.spec.crop:
                lq, hq = protocol.crop_pair(lq, hq, self.spec.crop, self.scale, what=f"dataset {self.name}: "
                                            f"{name}")
            return EvalImage(name, lq, hq, self.lq_paths[i], self.hq_paths[i])
        lq, hq = protocol.degraded_pair(hq, name, seed=self.spec.seed, crop=self.spec.crop, scale=self.scale,
                                        degradation=self._degradation, what=f"dataset {self.name}: {name}")
        return EvalImage(name, lq, hq, None, self.hq_paths[i])

    def __repr__(self) -> str:
        kind = "paired" if self.spec.paired else f"degraded (seed {self.spec.seed})"
        return f"EvalDataset({self.name!r}, {len(self)} images, {kind})"


def open_dataset(spec: DatasetSpec, scale: int = 4, max_images: int = 0, tfds_data_dir: str | None = None) -> Any:
    """The images of ``spec``: an :class:`EvalDataset` for folders, a
    :class:`jsr.eval.tfds_dataset.TfdsEvalDataset` for a TFDS set (read from ``spec.data_dir``, else
    ``tfds_data_dir``, else TFDS's default). Same interface: ``name``, ``spec``, ``names``, ``lq_paths``,
    ``hq_paths``, ``scale``, ``len`` and ``[i] -> EvalImage``.

    Raises what the two classes raise; for a TFDS set without tensorflow_datasets installed, ValueError (with the
    install command); for one not prepared, FileNotFoundError (with the command that prepares it)."""
    if spec.tfds:
        from jsr.eval.tfds_dataset import TfdsEvalDataset

        if tfds_data_dir and not spec.data_dir:  # the report records where the set was read
            spec = dataclasses.replace(spec, data_dir=str(tfds_data_dir))
        try:
            return TfdsEvalDataset(spec, max_images=max_images)
        except ImportError as e:  # a user's choice that this install cannot serve: a one-line error
            raise ValueError(f"dataset {spec.name}: {e}") from None
    return EvalDataset(spec, scale=scale, max_images=max_images)


def _key(path: Path, root: Path, strip: str) -> str:
    key = path.relative_to(root).with_suffix("").as_posix()
    return re.sub(strip, "", key) if strip else key


def parse_compare(text: str) -> tuple[str, str]:
    """``LABEL=DIR`` -> (label, folder template). ``{dataset}`` in DIR is replaced by each dataset's name."""
    label, eq, folder = text.partition("=")
    if not eq or not label.strip() or not folder.strip():
        raise ValueError(f"compare {text!r}: want LABEL=DIR (DIR may contain {{dataset}})")
    return label.strip(), folder.strip()


class SRFolder:
    """Another method's SR images for one dataset, matched to the dataset's keys (or to the LQ file stems).

    Raises FileNotFoundError for a missing folder, ValueError when a test image has no SR file."""

    def __init__(self, label: str, folder: str, ds: EvalDataset):
        self.label, self.folder = label, Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"compare {label}: folder {str(self.folder)!r} (dataset {ds.name}) does not exist")
        index: dict[str, str] = {}
        for p in list_images(self.folder):
            index.setdefault(_key(p, self.folder, ds.spec.strip), str(p))
            index.setdefault(p.relative_to(self.folder).with_suffix("").as_posix(), str(p))
        self.paths: dict[str, str] = {}
        missing = []
        for name, lq in zip(ds.names, ds.lq_paths):
            alt = Path(lq).relative_to(ds.spec.lq).with_suffix("").as_posix() if lq else name
            path = index.get(name) or index.get(alt)
            if path is None:
                missing.append(name)
            else:
                self.paths[name] = path
        if missing:
            raise ValueError(f"compare {label}: {len(missing)} of {len(ds)} images of {ds.name} have no SR file in "
                             f"{str(self.folder)!r} (by name or LQ file name): {missing[:10]}")

    def load(self, name: str) -> np.ndarray:
        """The SR image of test image ``name``: [H, W, 3] float32 in [0, 1]."""
        return load_image(self.paths[name])


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def check_inputs(datasets: Sequence[EvalDataset], compare: Sequence[tuple[str, str]] = (),
                 upscale: float = 4.0) -> dict[str, list[SRFolder]]:
    """Everything about the inputs that can fail, checked before any model runs (file headers only): unique
    dataset names, non-empty sets, every paired HQ the size of its LQ upscaled (with ``crop``: the aligned crops
    fit), every degraded, cropped or TFDS set at the ``upscale`` scale, every compare folder holding an image for
    every test image. Returns the matched compare folders per dataset. Raises ValueError (or FileNotFoundError)
    listing what is wrong."""
    names = [d.name for d in datasets]
    if not datasets:
        raise ValueError("no datasets given")
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    matched = {}
    for ds in datasets:
        if len(ds) == 0:
            raise ValueError(f"dataset {ds.name} has no images")
        if ds.spec.tfds or (ds.spec.paired and ds.spec.crop):
            if ds.scale != upscale:
                raise ValueError(f"dataset {ds.name}: its pairs are x{ds.scale} (HQ / LQ), the evaluation upscales "
                                 f"by x{upscale:g}")
        if ds.spec.paired and not ds.spec.tfds:
            bad = []
            for name, lq, hq in zip(ds.names, ds.lq_paths, ds.hq_paths):
                (w, h), want = _size(lq), _size(hq)
                if ds.spec.crop:  # the aligned crops must fit; whole images need not be exactly x scale
                    try:
                        protocol.paired_crop_boxes((h, w), want[::-1], ds.spec.crop, ds.scale, what=name)
                    except ValueError as e:
                        bad.append(str(e))
                elif (max(1, round(w * upscale)), max(1, round(h * upscale))) != want:
                    bad.append(f"{name} (LQ {w}x{h}, HQ {want[0]}x{want[1]})")
            if bad:
                kind = f"where the crop={ds.spec.crop} does not fit" if ds.spec.crop else \
                    f"where HQ is not x{upscale:g} the LQ"
                raise ValueError(f"dataset {ds.name}: {len(bad)} pair(s) {kind}: {bad[:10]}")
        elif not ds.spec.paired and ds.scale != upscale:
            raise ValueError(f"dataset {ds.name}: its HQ images are degraded by x{ds.scale}, the evaluation "
                             f"upscales by x{upscale:g}")
        matched[ds.name] = [SRFolder(lab, f.replace("{dataset}", ds.name), ds) for lab, f in compare]
    return matched
