"""The training input pipeline (Grain): source -> shuffle -> decode -> crop/flip -> degradation -> batches.

    MapDataset.source(source).seed(seed)
      .shuffle()                      a new permutation every epoch
      .repeat(num_epochs)             -1: forever
      .map(_Decode)                   read + decode; a failure becomes a "skip" marker (never an exception)
      .random_map(_CropDegrade)       random crop (pad or skip small images), flip, ``degrade`` with a seed drawn
                                      from Grain's per-index generator
      RowSelect(rows)                 this process's rows of every global batch (after the random map: draws
                                      depend on the global index; ``jsr.data.process_share``)
      .to_iter_dataset(ReadOptions)   threads per process
      .mp_prefetch(workers)           worker processes, each computing every ``num_workers``-th element
      .filter(_SkipCounter)           in the main process: drop, count and log skip markers; stop with
                                      DataStarvationError after a whole pass without a usable example
      .batch(per-host batch)          in the main process, so batches do not depend on the worker count
      ThreadPrefetchIterDataset       batches assembled ahead in a background thread

Per-example randomness is a function of (seed, global example index) only, and batching happens after the
workers' outputs are merged back in index order, so the stream of batches is identical for any number of worker
processes and threads, and a skipped image shifts the stream the same way everywhere. ``DataIterator.get_state``
is a JSON-serialisable dict (Orbax ``JsonSave``); ``set_state`` resumes the exact stream.

Batches: ``{"hq": [B,H,W,3], "lq": [B,H,W,3], "lq_small": [B,H/4,W/4,3]`` float32 in [0, 1], ``"prompt": [B] str}``.
``shard_batch`` places a batch on a device mesh with the batch axis split over the data-parallel axes.

Config keys (``default_config``; a ``data`` ConfigDict in the training config):

    source            "synthetic" | "folder" | "tfds"
    path              folder(s) for "folder" (comma-separated for several)
    tfds_name, tfds_split, tfds_data_dir, tfds_image_key, tfds_prompt_key     for "tfds"
    synthetic_images, synthetic_size, synthetic_seed                          for "synthetic"
    prompt            "empty" | "fixed" | "sidecar";   prompt_text   the fixed prompt / sidecar fallback
    crop_size         HQ crop (512); divisible by the degradation scale
    small_images      "pad" (reflect-pad up to the crop) | "skip"
    hflip             random horizontal flips
    batch_size        global batch; each process loads its rows of it (batch_size / process_count)
    seed, shuffle, num_epochs (-1 = forever), drop_remainder
    num_workers       worker processes (0: in the main process); worker_buffer_size: elements queued per worker
    read_threads, read_buffer_size   Grain ReadOptions per process; prefetch_batches: batches ready ahead
    cv2_threads       OpenCV threads per data process (1: one core each, scale with workers instead)
    degradation       nested ``DegradationConfig`` fields (``degradation_config("pisa")`` for PiSA-SR's)
    noun_masks        read per-image noun masks (``jsr.data.noun_masks``; batches then carry ``masks``, ``nouns``)
    max_nouns         noun slots per image with ``noun_masks``
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Sequence

import cv2
import grain
import ml_collections
import numpy as np
from absl import flags, logging

from jsr.data import degradation as deg
from jsr.data import noun_masks, process_share, sources

SMALL_IMAGE_POLICIES = ("pad", "skip")
SOURCES = ("synthetic", "folder", "tfds")


# --------------------------------------------------------------------------------------------- config


def degradation_config(preset: str = "realesrgan") -> ml_collections.ConfigDict:
    """The named degradation preset as a ConfigDict (``data.degradation``)."""
    return ml_collections.ConfigDict(deg.preset(preset).to_dict())


def default_config() -> ml_collections.ConfigDict:
    """Defaults of every data key (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"
    c.path = ""
    c.tfds_name = ""
    c.tfds_split = "train"
    c.tfds_data_dir = ""
    c.tfds_image_key = "image"
    c.tfds_prompt_key = ""
    c.synthetic_images = 256
    c.synthetic_size = 576
    c.synthetic_seed = 0
    c.prompt = "empty"
    c.prompt_text = ""
    # Share of a batch's prompts replaced by "" (PiSA-SR/FiDeSR train with 0.5); applied by the training loop.
    c.null_prompt_ratio = 0.0
    c.crop_size = 512
    c.small_images = "pad"
    c.hflip = True
    c.batch_size = 8
    c.seed = 0
    c.shuffle = True
    c.num_epochs = -1
    c.drop_remainder = True
    c.num_workers = 0
    c.worker_buffer_size = 2
    c.read_threads = 1
    c.read_buffer_size = 4
    c.prefetch_batches = 2
    c.cv2_threads = 1
    c.degradation = degradation_config("realesrgan")
    c.noun_masks = False
    c.max_nouns = 4
    return c


def resolve_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """Defaults overridden by ``cfg`` (a partial dict or ConfigDict). Unknown keys raise, naming them."""
    out = default_config()
    if cfg is None:
        return out
    given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = sorted(set(given) - set(out.keys()))
    if unknown:
        raise KeyError(f"data config: unknown key(s) {unknown}; known keys: {sorted(out.keys())}")
    degradation = given.pop("degradation", None)
    with out.ignore_type():
        out.update(given)
    if degradation is not None:
        out.degradation = ml_collections.ConfigDict(deg.resolve_config(degradation).to_dict())
    return out


def _validate(c: ml_collections.ConfigDict, scale: int) -> None:
    if c.source not in SOURCES:
        raise ValueError(f"data.source={c.source!r}: expected one of {SOURCES}")
    if c.small_images not in SMALL_IMAGE_POLICIES:
        raise ValueError(f"data.small_images={c.small_images!r}: expected one of {SMALL_IMAGE_POLICIES}")
    if c.crop_size <= 0 or c.crop_size % scale:
        raise ValueError(f"data.crop_size={c.crop_size} must be a positive multiple of the scale {scale}")
    if c.batch_size <= 0:
        raise ValueError(f"data.batch_size={c.batch_size} must be positive")


def make_source(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> Any:
    """The random-access source named by ``data.source``."""
    c = resolve_config(cfg)
    if c.source == "folder":
        if not c.path:
            raise ValueError("data.source='folder' needs data.path (a folder, or several comma-separated)")
        # Noun-mask sidecars' images are masks, not training images.
        return noun_masks.without_mask_files(sources.FolderSource(c.path, prompt=c.prompt, prompt_text=c.prompt_text))
    if c.source == "tfds":
        if not c.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'div2k/bicubic_x4')")
        if c.prompt == "sidecar":
            raise ValueError("data.prompt='sidecar' is for image folders; for TFDS use data.tfds_prompt_key")
        return sources.TfdsSource(c.tfds_name, split=c.tfds_split, data_dir=c.tfds_data_dir or None,
                                  image_key=c.tfds_image_key, prompt_key=c.tfds_prompt_key,
                                  prompt_text=c.prompt_text if c.prompt == "fixed" else "")
    if c.source == "synthetic":
        return sources.SyntheticSource(c.synthetic_images, c.synthetic_size, c.synthetic_size, c.synthetic_seed,
                                       prompt_text=c.prompt_text if c.prompt == "fixed" else "")
    raise ValueError(f"data.source={c.source!r}: expected one of {SOURCES}")


# --------------------------------------------------------------------------------------------- transforms


class _Decode(grain.transforms.Map):
    """Record -> ``{"image", "prompt", "name"}`` or a skip marker ``{"_skip": reason, "name", "why"}``."""

    def __init__(self, crop_size: int, small_images: str, max_nouns: int = 0):
        self.crop_size, self.small_images, self.max_nouns = crop_size, small_images, max_nouns

    def map(self, record: dict) -> dict:
        name = str(record.get("name", record.get("path", "?")))
        try:
            example = sources.load_record(record)
            if self.max_nouns:  # data.noun_masks: the image's noun masks (a damaged sidecar skips the image)
                example = noun_masks.attach(record, example, self.max_nouns)
        except Exception as e:  # noqa: BLE001 - any unreadable item is skipped, never fatal
            return {"_skip": "unreadable", "name": name, "why": f"{type(e).__name__}: {e}"}
        h, w = example["image"].shape[:2]
        if self.small_images == "skip" and min(h, w) < self.crop_size:
            return {"_skip": "too_small", "name": name, "why": f"{h}x{w} is smaller than the {self.crop_size} crop"}
        return example


def pad_to_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (bottom/right) an HxWxC image so both sides are at least ``size``."""
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return image
    mode = "reflect" if min(h, w) > 1 else "edge"  # reflection needs two pixels to mirror about
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """A ``size x size`` crop at a uniform position (after padding small images), flipped left-right with
    probability 1/2 when ``hflip``. Same dtype as the input."""
    image = pad_to_crop(image, size)
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = image[y:y + size, x:x + size]
    if hflip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


class _CropDegrade(grain.transforms.RandomMap):
    """Crop, flip, degrade; the degradation seed is drawn from Grain's per-index generator."""

    def __init__(self, crop_size: int, hflip: bool, degradation: deg.DegradationConfig):
        self.crop_size, self.hflip, self.degradation = crop_size, hflip, degradation

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if "_skip" in example:
            return example
        try:
            image, extra = example["image"], {}
            if "masks" in example:  # cut with the image, in one crop: the same draws as without masks
                image = np.concatenate([image, example["masks"].astype(image.dtype)], axis=-1)
            crop = random_crop_flip(image, self.crop_size, rng, self.hflip)
            if "masks" in example:
                crop, masks = noun_masks.split_crop(crop, example["image"].shape[-1])
                extra = {"masks": masks, "nouns": example["nouns"]}
            hq = sources.to_float01(crop)
            out = deg.degrade(hq, int(rng.integers(2 ** 63)), self.degradation)
        except Exception as e:  # noqa: BLE001 - a long run never dies on one image
            return {"_skip": "degrade_failed", "name": example["name"], "why": f"{type(e).__name__}: {e}"}
        return {"hq": hq, "lq": out["lq"], "lq_small": out["lq_small"], "prompt": example["prompt"], **extra}


class DataStarvationError(ValueError):
    """The data source yielded no usable example while every one of its items failed in a row (a whole pass: a
    folder of unreadable or too-small images). The message is one line: the source and the skip reasons by
    count."""


class _SkipCounter(grain.transforms.Filter):
    """Drops skip markers in the main process, so the counts cover every worker; logs each skipped item by name
    (once: later epochs only count it), and raises :class:`DataStarvationError` once ``window`` distinct items
    have failed since the last good example: without that, a source with no usable image makes the repeated
    stream spin forever and a training run waits on its first batch for good.

    Args:
      source: how the error names the data (its folders).
      window: distinct items that may fail in a row: the number of items this process can see, so the check
        fires after one whole pass without a good example and never while good ones still come.
    """

    def __init__(self, source: str = "the data source", window: int = 0):
        self.counts: collections.Counter = collections.Counter()
        self.source, self.window = source, int(window)
        self._since_good: dict[str, tuple[str, str]] = {}  # name -> (reason, why), since the last good example
        self._logged: set[str] = set()

    def filter(self, element: dict) -> bool:
        if "_skip" not in element:
            if self._since_good:
                self._since_good.clear()
            return True
        name, reason = element["name"], element["_skip"]
        self.counts[reason] += 1
        if name not in self._logged:
            self._logged.add(name)
            logging.warning("data: skipped %s (%s: %s); skipped so far: %s", name, reason, element["why"],
                            dict(self.counts))
        self._since_good[name] = (reason, element["why"])
        if self.window and len(self._since_good) >= self.window:
            by_reason = collections.Counter(r for r, _ in self._since_good.values())
            reasons = ", ".join(f"{r} {n}" for r, n in by_reason.most_common())
            _, why = next(iter(self._since_good.values()))
            raise DataStarvationError(
                f"data: no usable image in {self.source}: all {len(self._since_good)} of its images were skipped "
                f"in a row ({reasons}; e.g. {why})")
        return False


def _describe(src: Any) -> str:
    """How errors name a source: its folders, TFDS name, or repr."""
    roots = getattr(src, "roots", None)
    if roots:
        return ", ".join(str(r) for r in roots)
    if getattr(src, "name", None) and getattr(src, "split", None):
        return f"TFDS {src.name}[{src.split}]"
    return repr(src)


def collate(examples: Sequence[dict]) -> dict:
    """Stack examples into a batch; prompts become a [B] numpy string array."""
    return {"hq": np.stack([e["hq"] for e in examples]), "lq": np.stack([e["lq"] for e in examples]),
            "lq_small": np.stack([e["lq_small"] for e in examples]),
            "prompt": np.asarray([e["prompt"] for e in examples], dtype=np.str_), **noun_masks.collate(examples)}


def _init_worker(cv2_threads: int, worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    if cv2_threads > 0:
        cv2.setNumThreads(cv2_threads)


# --------------------------------------------------------------------------------------------- assembly


def build_dataset(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None, *, source: Any = None,
                  process_index: int = 0, process_count: int = 1,
                  rows: Sequence[int] | None = None) -> tuple[grain.IterDataset, _SkipCounter]:
    """The batched ``IterDataset`` for this process and its skip counter.

    Args:
      cfg: data config (partial dicts are completed with ``default_config``).
      source: overrides ``data.source`` with any random-access source of records (tests).
      process_index, process_count: this host's share of the global batch and of the example stream: the
        ``process_index``-th contiguous block of each global batch's rows, unless ``rows`` says which.
      rows: the global batch rows this process loads (``jsr.data.process_share``; the training loop reads them
        from the batch sharding).
    """
    c = resolve_config(cfg)
    dcfg = deg.resolve_config(c.degradation)
    _validate(c, dcfg.scale)
    if rows is None:
        rows = process_share.contiguous_rows(process_index, process_count, int(c.batch_size))
    rows = process_share.check_rows(rows, int(c.batch_size))
    src = make_source(c) if source is None else source
    if len(src) == 0:
        raise ValueError(f"data source {src!r} is empty")

    ds = grain.MapDataset.source(src).seed(int(c.seed))
    if c.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None if c.num_epochs < 0 else int(c.num_epochs))
    ds = ds.map(_Decode(int(c.crop_size), c.small_images, int(c.max_nouns) if c.noun_masks else 0))
    ds = ds.random_map(_CropDegrade(int(c.crop_size), bool(c.hflip), dcfg))
    if len(rows) < c.batch_size:
        ds = process_share.RowSelect(ds, rows, int(c.batch_size))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(c.read_threads),
                                              prefetch_buffer_size=int(c.read_buffer_size)))
    if c.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(c.num_workers),
                                                         per_worker_buffer_size=int(c.worker_buffer_size)),
                            worker_init_fn=functools.partial(_init_worker, int(c.cv2_threads)))
    window = process_share.distinct_items(rows, int(c.batch_size), len(src), bool(c.shuffle))
    counter = _SkipCounter(_describe(src), window)
    it = it.filter(counter)
    it = it.batch(len(rows), drop_remainder=bool(c.drop_remainder), batch_fn=collate)
    if c.prefetch_batches > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=int(c.prefetch_batches))
    return it, counter


class DataIterator:
    """Iterator over batches with checkpointable state.

    ``get_state()`` returns a JSON-serialisable dict; a new iterator built from the same config and given that
    state with ``set_state`` yields exactly the batches the first would have yielded next. ``skipped`` counts the
    images dropped so far in this process, by reason (``unreadable``, ``too_small``, ``degrade_failed``).
    ``next`` raises :class:`DataStarvationError` when a whole pass over the source gave no usable example.

    ``interrupt_safe``: an exception raised into a blocked ``next`` (a signal handler's) leaves ``get_state``
    at the last batch returned. True when a prefetch thread assembles the batches (the main thread only waits on
    its queue); with ``prefetch_batches=0`` the main thread is inside Grain's transforms, whose state may then be
    half-advanced.
    """

    def __init__(self, dataset: grain.IterDataset, counter: _SkipCounter, interrupt_safe: bool = False):
        self._iterator = iter(dataset)
        self._counter = counter
        self.interrupt_safe = interrupt_safe

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._counter.counts)

    def close(self) -> None:
        """Stop worker processes and threads (also done on garbage collection)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_iterator(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None = None, *, source: Any = None,
                  process_index: int | None = None, process_count: int | None = None,
                  rows: Sequence[int] | None = None) -> DataIterator:
    """Build the pipeline for this process (JAX's process index/count unless given; ``rows``: see
    :func:`build_dataset`) and start iterating."""
    if rows is not None:
        process_index, process_count = 0, 1  # unused: the rows say which examples are this process's
    elif process_index is None or process_count is None:
        import jax  # only here: worker processes never need JAX

        process_index, process_count = jax.process_index(), jax.process_count()
    c = resolve_config(cfg)
    if c.num_workers == 0 and c.cv2_threads > 0:
        cv2.setNumThreads(int(c.cv2_threads))  # this process is the data worker
    if c.num_workers > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's worker start reads absl flags; outside an absl app, their defaults
    dataset, counter = build_dataset(c, source=source, process_index=process_index, process_count=process_count,
                                     rows=rows)
    return DataIterator(dataset, counter, interrupt_safe=c.prefetch_batches > 0)


# --------------------------------------------------------------------------------------------- devices


def shard_batch(batch: Mapping[str, Any], mesh: Any, batch_axes: Sequence[str] = ("data", "fsdp")) -> dict:
    """Put this process's batch on ``mesh`` as global ``jax.Array``s with axis 0 split over ``batch_axes``.

    Numeric arrays become sharded arrays of global batch ``local_batch * process_count``; other entries
    (prompts) stay host-side as they are. Axes missing from the mesh are ignored.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(a for a in batch_axes if a in mesh.shape)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            out[key] = value
            continue
        global_batch = arr.shape[0] * jax.process_count()
        if global_batch % ways:
            raise ValueError(f"shard_batch: {key!r} has global batch {global_batch}, not divisible by the "
                             f"{ways}-way data parallelism of mesh axes {axes}")
        spec = PartitionSpec(axes if axes else None, *([None] * (arr.ndim - 1)))
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), arr)
    return out
