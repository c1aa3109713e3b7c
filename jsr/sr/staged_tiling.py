"""Tiled execution of a network cut at its GroupNorms (:mod:`jsr.models.vae_stages`), with every GroupNorm using
the statistics of the whole image: how the VAE is tiled for large images.

Blending tiles of a function (:func:`jsr.sr.tiling.tiled_map`) is right for a local function and wrong for one
with GroupNorms: each tile would normalise with its own statistics, so the error is everywhere, not only at
seams. Here the network runs stage by stage over all tiles:

1. The image is covered by equal windows (:func:`jsr.sr.tiling.tile_starts`, starts multiples of ``align``) and
   partitioned into *cores*, one per window: neighbouring windows' overlap is split at its (aligned) middle, so a
   core keeps at least half the overlap of context on every side that has a neighbour.
2. Stage ``k`` runs on every window (one batch of ``tiles_per_call`` windows at a time; every call has one shape,
   so each stage compiles once). The same call reduces its output over the window's core to a per-group count,
   mean and centred sum of squares.
3. The host combines those (float64, Chan's parallel formula) into the whole image's group mean and variance,
   which stage ``k + 1``'s GroupNorm uses on every tile. Each pixel counts once, since cores partition the image.
4. The output is the mosaic of the last stage's cores: no blending.

A *pointwise* stage (the mid-block attention's second half: each query against the whole image's gathered keys
and values, then a per-pixel projection) runs on the image's pixels instead of its windows: the windows' cores
are assembled into a mosaic, cut into chunks of a window's pixel count (one program shape), and the result is cut
back into windows. Its queries are computed once per pixel rather than once per window pixel (the overlaps
repeated ~1.5-1.75x of them at the default tiles: the largest cost on large images, quadratic in their area), and
an overlap pixel continues with its core owner's value instead of a border-affected one of its own window.

Between stages the carries of all windows live on the host (numpy), so device memory holds one batch of windows;
host memory holds the current stage's activations for the whole image (plus the overlap): with SD's VAE (128-512
channels) that is tens of GB for a 4096x3072 output. With ``spill_dir`` the carries go to files there instead
(written and read whole, one call's worth in memory at a time), and :meth:`StagedTiler.estimate` says beforehand
what either way needs; :meth:`jsr.sr.infer.Restorer.plan` chooses between them under a memory budget.

Exactness. The norms are the whole image's up to how far window borders reach into the cores: convolutions at a
window's inner border see zero padding instead of the neighbour, and the error grows inwards by each layer's
receptive field; the mid-block attention sees every position of the image (its keys and values are gathered) and
re-synchronises the windows' overlaps (above). The border error does not go away (the VAE's receptive field is
larger than any practical overlap); it shrinks as overlap and tiles grow. ``tests/test_staged_tiling.py`` states
the measured figures.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import warnings
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsr.models.vae_stages import Stage
from jsr.sr.data_parallel import DataParallel
from jsr.sr.tiling import scaled, tile_starts


def core_bounds(starts: Sequence[int], tile: int, size: int, align: int = 1) -> list[int]:
    """Boundaries ``[0, m_1, ..., size]`` of the cores of windows ``[s_i, s_i + tile)`` along one axis: the
    overlap of windows ``i - 1`` and ``i``, ``[s_i, s_{i-1} + tile)``, is cut at its middle rounded to a multiple of
    ``align`` (starts and ``tile`` being multiples of it, the cut stays inside both windows)."""
    cuts = [align * round((s + prev + tile) / (2 * align)) for prev, s in zip(starts, starts[1:])]
    return [0] + cuts + [size]


def _combine(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image group mean and biased variance from per-tile ``counts`` [T], ``means`` and ``m2s`` [T, N, G]
    (float64, Chan et al.'s pairwise update in closed form)."""
    n = counts.sum()
    w = (counts / n)[:, None, None]
    mean = (w * means).sum(0)
    m2 = m2s.sum(0) + (counts[:, None, None] * np.square(means - mean)).sum(0)
    return mean, m2 / n


def _masked_moments(x: jax.Array, mask: jax.Array, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group count, mean and centred sum of squares of ``x`` [N, H, W, C] over the pixels where ``mask``
    [N, H, W] is 1 (float32). Returns ``(count [N], mean [N, G], m2 [N, G])``."""
    n, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
    m = mask[:, :, :, None, None]
    count = mask.sum((1, 2)) * (c // groups)
    mean = (xf * m).sum((1, 2, 4)) / count[:, None]
    m2 = (jnp.square(xf - mean[:, None, None, :, None]) * m).sum((1, 2, 4))
    return count, mean, m2


def _stage_call(stage: Stage, next_groups: int, dp: DataParallel | None = None):
    """The jitted stage: ``(params, carry, mean, var, context, core_mask) -> (carry, moments of carry["x"] over
    the mask)`` (moments ``None`` when no GroupNorm follows). The carry is donated: it arrives from the host as a
    fresh buffer, and XLA may write the output over it (a stage whose output differs in shape cannot reuse it,
    which JAX would warn about on every compile: not news here). With ``dp`` the windows of a call (carry, the
    statistics tiled per window, the masks) are split over its devices; the gathered whole-image context is
    replicated."""
    def call(params, carry, mean, var, context, mask):
        out = stage.fn(params, carry, mean, var, context)
        return out, (_masked_moments(out["x"], mask, next_groups) if next_groups else None)
    if dp is None:
        jitted = jax.jit(call, donate_argnums=1)
    else:
        jitted = dp.map(call, batched=(False, True, True, True, False, True), donate=(1,))

    def run(*args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return jitted(*args)
    run.fn = call  # unjitted, for memory accounting (benchmarks/tiled_vae.py, StagedTiler.estimate)
    run.jitted = jitted if dp is None else None  # compiled ahead for XLA's memory figures (StagedTiler.temporaries)
    run.next_groups = next_groups
    return run


@dataclasses.dataclass(frozen=True)
class StagedEstimate:
    """What a staged run of one image size needs (bytes), from the stages' shapes (``jax.eval_shape``; nothing
    runs).

    Attributes:
      windows, calls: windows of the image; stage calls (= progress steps: stages x calls per stage).
      in_memory: peak host bytes with every window's carries held in memory between stages.
      spilled: peak host bytes with the carries on disk (one call's carries in memory, plus the whole-image
        arrays: the gathered attention inputs and the output mosaic).
      disk: disk the spilled run writes at most (one stage's carries in and out).
      per_call: one call's input and output carries (what a device holds besides the parameters and XLA's
        temporaries).
      stages: programs (one per stage; ``calls / stages`` calls each, stage after stage).
      window: a call's input shape ``(windows per call x batch, height, width)`` (for time estimates).
      device: the most one call holds on its device besides parameters and XLA's temporaries: its input and
        output carries and the whole-image arrays it reads (the gathered attention keys and values).
    """

    windows: int
    calls: int
    in_memory: int
    spilled: int
    disk: int
    per_call: int
    stages: int = 1
    window: tuple[int, ...] = ()
    device: int = 0


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class _CarryStore:
    """The carries of the current stage, one dict of arrays per call: in memory, or each in a ``.npy`` file of a
    temporary folder (written and read whole, not memory-mapped: mapped pages would count in the process's
    resident memory until the kernel wrote them back)."""

    def __init__(self, spill_dir: str | os.PathLike | None):
        self._tmp = None if spill_dir is None else tempfile.TemporaryDirectory(prefix="jsr-tiles-",
                                                                               dir=str(spill_dir))
        self._items: dict[int, dict[str, Any]] = {}
        self._serial = 0

    def put(self, i: int, carry: dict[str, Any]) -> None:
        if self._tmp is None:
            self._items[i] = carry
            return
        old = self._items.get(i, {})
        paths = {}
        for key, value in carry.items():
            self._serial += 1
            path = os.path.join(self._tmp.name, f"{i}-{key}-{self._serial}.npy")
            np.save(path, np.asarray(value), allow_pickle=False)
            paths[key] = path
        self._drop(old)
        self._items[i] = paths

    def get(self, i: int, key: str | None = None) -> Any:
        """Call ``i``'s carry (a dict), or its array ``key``."""
        item = self._items[i]
        if self._tmp is None:
            return item if key is None else item[key]
        if key is not None:
            return np.load(item[key])
        return {k: np.load(path) for k, path in item.items()}

    def keys(self, i: int) -> list[str]:
        """The array names of call ``i``'s carry (without loading them)."""
        return list(self._items[i])

    def pop(self, i: int, key: str) -> Any:
        value = self.get(i, key)
        entry = self._items[i].pop(key)
        if self._tmp is not None:
            os.remove(entry)
        return value

    def _drop(self, item: dict) -> None:
        if self._tmp is not None:
            for path in item.values():
                os.remove(path)

    def close(self) -> None:
        self._items.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


class StagedTiler:
    """Runs a list of stages tile by tile with whole-image GroupNorm statistics (see the module docstring).

    Build one per network, then call it on any image size. ``calls`` are the jitted stage programs
    (``(params, carry, mean, var, context, core_mask) -> (carry, moments)``), cached on the tiler. With ``dp``
    (:class:`jsr.sr.data_parallel.DataParallel`) the parameters are replicated on its devices once and every
    call's windows are split over them.
    """

    def __init__(self, stages: Sequence[Stage], params: Any, dp: DataParallel | None = None):
        if not stages or stages[0].groups:
            raise ValueError("staged tiling needs stages whose first has no GroupNorm")
        self.stages, self.dp = list(stages), dp
        self.params = params if dp is None else dp.replicate(params)
        nxt = [s.groups for s in self.stages[1:]] + [0]
        self.calls = [_stage_call(s, g, dp) for s, g in zip(self.stages, nxt)]
        self._temporaries: dict[tuple, int] = {}

    def _layout(self, shape: Sequence[int], tile: int, overlap: int, align: int, tiles_per_call: int):
        """``(windows, groups padded to k windows, real windows per group, k, th, tw)`` for an input ``shape``."""
        h, w = shape[1], shape[2]
        th, tw = min(tile, h), min(tile, w)
        if h % align or w % align or th % align or tw % align:
            raise ValueError(f"staged tiling: image {h}x{w} and tile {th}x{tw} must be multiples of {align}")
        ys = tile_starts(h, th, max(0, min(overlap, th - align)), align)
        xs = tile_starts(w, tw, max(0, min(overlap, tw - align)), align)
        cy, cx = core_bounds(ys, th, h, align), core_bounds(xs, tw, w, align)
        windows = [_Window(y, xx, cy[i], cy[i + 1], cx[j], cx[j + 1], th, tw)
                   for i, y in enumerate(ys) for j, xx in enumerate(xs)]
        k = max(1, min(int(tiles_per_call), len(windows)))
        # Each call takes k windows (the last group repeats its last window, so every call has one shape); only
        # the first `real` windows of a group count towards statistics and output.
        groups = [windows[g:g + k] for g in range(0, len(windows), k)]
        real = [len(grp) for grp in groups]
        groups = [grp + [grp[-1]] * (k - len(grp)) for grp in groups]
        return windows, groups, real, k, th, tw

    def steps(self, shape: Sequence[int], tile: int, overlap: int, *, align: int = 1,
              tiles_per_call: int = 1) -> int:
        """How many stage calls (progress steps) a run on an input of ``shape`` makes."""
        windows, groups, _, k, th, tw = self._layout(shape, tile, overlap, align, tiles_per_call)
        return sum(len(groups) if c is None else c[3]
                   for c in (self._chunking(st, shape, th, tw, k, len(windows)) for st in self.stages))

    def _chunking(self, stage: Stage, shape: Sequence[int], th: int, tw: int, k: int,
                  windows: int) -> tuple[int, int, int, int] | None:
        """How a pointwise stage runs on the image's pixels instead of its windows: ``(pixels per chunk = a
        window's, image pixels, chunks, calls of k chunks)`` at the stage's scale; None when it runs per window
        (not pointwise, or one window: nothing repeats)."""
        if not stage.pointwise or windows <= 1:
            return None
        s = stage.scale
        p = scaled(th, s) * scaled(tw, s)
        n_px = scaled(shape[1], s) * scaled(shape[2], s)
        chunks = -(-n_px // p)
        return p, n_px, chunks, -(-chunks // k)

    def estimate(self, shape: Sequence[int], dtype: Any, tile: int, overlap: int, *, align: int = 1,
                 tiles_per_call: int = 1) -> StagedEstimate:
        """Memory of a run on an input of ``shape`` and ``dtype`` (:class:`StagedEstimate`), from the stages'
        output shapes. Host arrays are counted; NumPy/JAX bookkeeping and the parameters are not."""
        windows, groups, _, k, th, tw = self._layout(shape, tile, overlap, align, tiles_per_call)
        b, h, w = shape[0], shape[1], shape[2]
        n = len(groups)
        in_memory = spilled = disk = per_call = device = calls = 0
        image_in = int(np.prod(shape)) * np.dtype(dtype).itemsize  # the windows are cut from it
        for stage, _, (carry, _, _, context, _), out in self._call_specs(shape, dtype, tile, overlap, align,
                                                                          tiles_per_call):
            c_in, c_out = _nbytes(carry), _nbytes(out)
            ctx = 2 * _nbytes(context)  # the mosaic and its device copy
            chunking = self._chunking(stage, shape, th, tw, k, len(windows))
            calls += n if chunking is None else chunking[3]
            if chunking is not None:  # whole-image mosaics of the stage's input and output beside the windows
                px = chunking[1] * b / (k * b * chunking[0])  # image pixels over one call's
                img_in, img_out = int(c_in * px), int(c_out * px)
                in_memory = max(in_memory, n * c_in + img_in + ctx, img_in + img_out + ctx,
                                img_out + n * c_out + ctx)
                spilled = max(spilled, img_in + img_out + ctx)
            in_memory = max(in_memory, n * max(c_in, c_out) + min(c_in, c_out) + ctx)
            spilled = max(spilled, c_in + c_out + ctx)
            disk = max(disk, n * (c_in + c_out))
            per_call = max(per_call, c_in + c_out)
            device = max(device, c_in + c_out + ctx // 2)
            if stage.gather:
                gathered = _nbytes({key: jax.ShapeDtypeStruct(
                    (b, scaled(h, stage.scale), scaled(w, stage.scale), out[key].shape[-1]), out[key].dtype)
                    for key in stage.gather})
                in_memory = max(in_memory, n * c_out + 2 * gathered)
                spilled = max(spilled, c_out + 2 * gathered)
        carry = {key: v for key, v in out.items() if key not in self.stages[-1].gather}
        final = b * scaled(h, self.stages[-1].scale) * scaled(w, self.stages[-1].scale) * 4 * out["x"].shape[-1]
        in_memory = max(in_memory, n * _nbytes(carry) + final, n * _nbytes({"x": carry["x"]}) + image_in)
        spilled = max(spilled, _nbytes(carry) + final, image_in)
        return StagedEstimate(len(windows), calls, in_memory, spilled, disk, per_call,
                              len(self.stages), (k * b, th, tw), device)

    def _call_specs(self, shape: Sequence[int], dtype: Any, tile: int, overlap: int, align: int,
                    tiles_per_call: int):
        """Yield ``(stage, call, argument shapes (carry, mean, var, context, mask), output carry shapes)`` of
        every stage of a run on an input of ``shape``, in order (``jax.eval_shape``: nothing runs)."""
        windows, groups, _, k, th, tw = self._layout(shape, tile, overlap, align, tiles_per_call)
        b, h, w = shape[0], shape[1], shape[2]
        sds = jax.ShapeDtypeStruct
        carry = {"x": sds((k * b, th, tw, shape[3]), dtype)}
        mean = var = context = None
        for stage, call in zip(self.stages, self.calls):
            ths, tws = scaled(th, stage.scale), scaled(tw, stage.scale)
            chunking = self._chunking(stage, shape, th, tw, k, len(windows))
            if chunking is None:
                mask = sds((k * b, ths, tws), np.float32)
            else:  # k chunks of a window's pixel count, as one row each
                carry = {key: sds((k * b, 1, chunking[0], v.shape[-1]), v.dtype) for key, v in carry.items()}
                mask = sds((k * b, 1, chunking[0]), np.float32)
            out, _ = jax.eval_shape(call.fn, self.params, carry, mean, var, context, mask)
            yield stage, call, (carry, mean, var, context, mask), out
            if chunking is not None:  # cut back into windows for the next stage
                out = {key: sds((k * b, ths, tws, v.shape[-1]), v.dtype) for key, v in out.items()}
            context = None
            if stage.gather:
                context = {key: sds((b, scaled(h, stage.scale), scaled(w, stage.scale), out[key].shape[-1]),
                                    out[key].dtype) for key in stage.gather}
                out = {key: v for key, v in out.items() if key not in stage.gather}
            mean = var = None if not call.next_groups else sds((k * b, call.next_groups), np.float32)
            carry = out

    def temporaries(self, shape: Sequence[int], dtype: Any, tile: int, overlap: int, *, align: int = 1,
                    tiles_per_call: int = 1) -> int | None:
        """The largest XLA temporary buffer bytes of one stage call of a run on an input of ``shape`` (the working
        memory a call needs beyond its arguments and outputs, from ``memory_analysis()``). Compiles every stage
        program for this layout, as the run's first calls would (they then reuse them: JAX caches the compiled
        programs). None when split over several devices (each device's program is accounted there). Remembered per
        layout (a plan that tries several tile sizes asks again for the one it keeps)."""
        if self.dp is not None:
            return None
        key = (tuple(int(v) for v in shape), np.dtype(dtype).name, tile, overlap, align, tiles_per_call)
        if key in self._temporaries:
            return self._temporaries[key]
        temp = 0
        for _, call, args, _ in self._call_specs(shape, dtype, tile, overlap, align, tiles_per_call):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                compiled = call.jitted.lower(self.params, *args).compile()
            mem = compiled.memory_analysis()
            if mem is not None:
                temp = max(temp, int(mem.temp_size_in_bytes))
        self._temporaries[key] = temp
        return temp

    def _pointwise(self, call, store: "_CarryStore", groups: list, real: list[int], k: int,
                   size: tuple[int, int, int], s: Fraction,
                   chunking: tuple[int, int, int, int], norm_ctx: tuple, progress) -> list:
        """Run a pointwise stage once per image pixel: the windows' carries are assembled into the mosaic of their
        cores, cut into chunks of a window's pixel count (k per call, every call one shape), and the output
        mosaic is cut back into the windows for the next stage. Overlap pixels thereby take their core owner's
        values (as the untiled network has them) instead of their own window's border-affected ones. Returns
        the per-chunk moments as the window loop gathers them."""
        b, h, w = size
        p, n_px, chunks, calls = chunking
        mean, var, context = norm_ctx
        keys = list(store.keys(0))
        flat = {}
        for key in keys:
            parts = [functools.partial(store.get, gi, key) for gi in range(len(groups))]
            m = _mosaic(parts, groups, real, b, h, w, s)
            flat[key] = m.reshape(b, n_px, m.shape[-1])
        for gi in range(len(groups)):  # the windows' own copies are superseded by the mosaic
            store.put(gi, {})
        stats: list = []
        out_flat: dict[str, np.ndarray] = {}
        rows = np.arange(p)
        for ci in range(calls):
            idx = [min(ci * k + t, chunks - 1) for t in range(k)]  # the last call repeats its last chunk
            n_real = min(k, chunks - ci * k)
            carry = {key: np.concatenate([_chunk(a, j, p) for j in idx], 0)[:, None] for key, a in flat.items()}
            masks = np.concatenate([np.broadcast_to((j * p + rows < n_px).astype(np.float32), (b, 1, p))
                                    for j in idx], 0)
            out, mom = call(self.params, carry, mean, var, context, masks)
            out = jax.tree.map(np.asarray, out)
            for key, v in out.items():
                if key not in out_flat:
                    out_flat[key] = np.zeros((b, n_px, v.shape[-1]), v.dtype)
                for t in range(n_real):
                    lo, hi = idx[t] * p, min((idx[t] + 1) * p, n_px)
                    out_flat[key][:, lo:hi] = v[t * b:(t + 1) * b, 0, :hi - lo]
            del out, carry
            if mom is not None:
                cnt, mu, m2 = (np.asarray(a, np.float64) for a in mom)
                stats += [(cnt[t * b], mu[t * b:(t + 1) * b], m2[t * b:(t + 1) * b]) for t in range(n_real)]
            if progress is not None:
                progress(1)
        del flat
        images = {key: v.reshape(b, scaled(h, s), scaled(w, s), -1) for key, v in out_flat.items()}
        for gi, grp in enumerate(groups):
            store.put(gi, {key: _cut(v, grp, s) for key, v in images.items()})
        return stats

    def __call__(self, x: np.ndarray | jax.Array, tile: int, overlap: int, *, align: int = 1,
                 tiles_per_call: int = 1, spill_dir: str | os.PathLike | None = None,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The staged network on ``x`` [B, H, W, C] (NHWC, the network's input range) in windows of ``tile``
        input pixels (clipped to the image) overlapping by at least ``overlap``; starts are multiples of
        ``align`` (the network's total downsampling, so every window maps onto whole pixels at every stage).

        ``spill_dir``: keep the carries between stages in files under this folder instead of in memory (host
        memory then holds one call's carries; the result is the same, bit for bit). ``progress(1)`` is called
        after every stage call (:meth:`steps` of them).

        Returns numpy float32 [B, H s, W s, C'] with ``s`` the last stage's scale. One window covering the image
        computes what the untiled network does.
        """
        b, h, w, _ = x.shape
        windows, groups, real, k, th, tw = self._layout(x.shape, tile, overlap, align, tiles_per_call)
        store = _CarryStore(spill_dir)
        try:
            for gi, grp in enumerate(groups):
                store.put(gi, {"x": _cut(x, grp, Fraction(1))})
            mean = var = context = None
            for stage, call in zip(self.stages, self.calls):
                stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
                mb = None if mean is None else np.tile(mean, (k, 1))
                vb = None if var is None else np.tile(var, (k, 1))
                chunking = self._chunking(stage, x.shape, th, tw, k, len(windows))
                if chunking is not None:
                    stats = self._pointwise(call, store, groups, real, k, (b, h, w), stage.scale,
                                            chunking, (mb, vb, context), progress)
                for gi, grp in enumerate(groups if chunking is None else ()):
                    masks = np.concatenate([np.repeat(w_.core_mask(stage.scale)[None], b, 0) for w_ in grp], 0)
                    out, mom = call(self.params, store.get(gi), mb, vb, context, masks)
                    store.put(gi, jax.tree.map(np.asarray, out))
                    del out
                    if mom is not None:
                        cnt, mu, m2 = (np.asarray(a, np.float64) for a in mom)
                        stats += [(cnt[t * b], mu[t * b:(t + 1) * b], m2[t * b:(t + 1) * b])
                                  for t in range(real[gi])]
                    if progress is not None:
                        progress(1)
                mean = var = context = None
                if stats:
                    mean, var = _combine(*(np.stack(a) for a in zip(*stats)))
                    mean, var = mean.astype(np.float32), var.astype(np.float32)
                if stage.gather:
                    # Put once: every call of the next stage reads the same whole-image arrays (in the carry's
                    # dtype).
                    context = {}
                    for key in stage.gather:
                        parts = [functools.partial(store.pop, gi, key) for gi in range(len(groups))]
                        mosaic = _mosaic(parts, groups, real, b, h, w, stage.scale)
                        context[key] = jax.device_put(mosaic) if self.dp is None else self.dp.replicate(mosaic)
            parts = [functools.partial(store.get, gi, "x") for gi in range(len(groups))]
            return _mosaic(parts, groups, real, b, h, w, self.stages[-1].scale, np.float32)
        finally:
            store.close()


class _Window:
    """A window ``[y, y + th) x [x, x + tw)`` of the input and its core ``[y0, y1) x [x0, x1)`` (image
    coordinates, input pixels)."""

    def __init__(self, y: int, x: int, y0: int, y1: int, x0: int, x1: int, th: int, tw: int):
        self.y, self.x, self.y0, self.y1, self.x0, self.x1, self.th, self.tw = y, x, y0, y1, x0, x1, th, tw

    def core(self, s: Fraction) -> tuple[slice, slice]:
        """The core within the window at scale ``s``."""
        return (slice(scaled(self.y0 - self.y, s), scaled(self.y1 - self.y, s)),
                slice(scaled(self.x0 - self.x, s), scaled(self.x1 - self.x, s)))

    def box(self, s: Fraction) -> tuple[slice, slice]:
        """The whole window in image coordinates at scale ``s``."""
        y, x = scaled(self.y, s), scaled(self.x, s)
        return slice(y, y + scaled(self.th, s)), slice(x, x + scaled(self.tw, s))

    def core_in_image(self, s: Fraction) -> tuple[slice, slice]:
        return (slice(scaled(self.y0, s), scaled(self.y1, s)), slice(scaled(self.x0, s), scaled(self.x1, s)))

    def core_mask(self, s: Fraction) -> np.ndarray:
        """[th s, tw s] float32, 1 on the core."""
        m = np.zeros((scaled(self.th, s), scaled(self.tw, s)), np.float32)
        m[self.core(s)] = 1.0
        return m


def _mosaic(parts: list[Callable[[], Any]], groups: list[list[_Window]], real: list[int], b: int, h: int, w: int,
            s: Fraction, dtype: Any = None) -> np.ndarray:
    """The image [b, h s, w s, C] (``dtype``, default the parts') assembled from every window's core of
    ``parts`` (one loader per group, returning its [k b, ...] array: the parts are read one at a time)."""
    out = None
    for load, grp, n in zip(parts, groups, real):
        part = np.asarray(load())
        if out is None:
            out = np.zeros((b, scaled(h, s), scaled(w, s), part.shape[-1]), dtype or part.dtype)
        for t, w_ in enumerate(grp[:n]):
            out[(slice(None),) + w_.core_in_image(s)] = part[(slice(t * b, (t + 1) * b),) + w_.core(s)]
    return out


def _cut(img: Any, grp: list[_Window], s: Fraction) -> np.ndarray:
    """The windows of ``grp`` cut from ``img`` [b, H s, W s, C] at scale ``s``, stacked window-major
    ([k b, th s, tw s, C])."""
    return np.concatenate([np.asarray(img[(slice(None),) + w_.box(s)]) for w_ in grp], 0)


def _chunk(a: np.ndarray, j: int, p: int) -> np.ndarray:
    """Chunk ``j`` of ``p`` pixels of ``a`` [b, n, C] ([b, p, C]), zero-padded past the end."""
    part = a[:, j * p:(j + 1) * p]
    if part.shape[1] < p:
        part = np.concatenate([part, np.zeros((a.shape[0], p - part.shape[1], a.shape[2]), a.dtype)], 1)
    return part


class TiledVAE:
    """The SD VAE of a :class:`jsr.sr.generator.SDModels` run by :class:`StagedTiler` for large images: what
    :func:`jsr.sr.generator.encode` (posterior mean) and :func:`jsr.sr.generator.decode` compute, tile by tile.

    The encoder LoRA (OSEDiff's) is folded into the encoder's weights once (``jsr.models.lora.merge``): in float32
    that equals the LoRA branch to rounding; with bf16 parameters the merged kernel is rounded to bf16 once.
    ``dp``: run every stage call's windows split over these devices (:mod:`jsr.sr.data_parallel`).
    """

    def __init__(self, models: Any, vae_params: Any, vae_lora: Any = None, dp: DataParallel | None = None):
        from jsr.models import lora as lora_lib
        from jsr.models.vae_stages import decoder_stages, encoder_stages

        vae = models.vae
        enc_params = vae_params if vae_lora is None else lora_lib.merge(vae_params, vae_lora)
        self._encoder = StagedTiler(encoder_stages(vae), enc_params, dp)
        self._decoder = StagedTiler(decoder_stages(vae), vae_params, dp)
        self.scaling_factor = float(models.scaling_factor)
        self.latent_channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _encode_tiles(self, tile: int, overlap: int) -> tuple[int, int]:
        f = self.factor
        return max(f, tile - tile % f), -(-overlap // f) * f

    def encode(self, x: np.ndarray, tile: int, overlap: int, tiles_per_call: int = 1, *,
               spill_dir: str | os.PathLike | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Images [B, H, W, 3] in [-1, 1] (H, W multiples of 8) -> scaled latents [B, H/8, W/8, 4] (float32) in
        windows of ``tile`` pixels (rounded down to a multiple of 8) overlapping by ``overlap`` (rounded up).
        ``spill_dir``, ``progress``: as :class:`StagedTiler`."""
        tile, overlap = self._encode_tiles(tile, overlap)
        moments = self._encoder(x, tile, overlap, align=self.factor, tiles_per_call=tiles_per_call,
                                spill_dir=spill_dir, progress=progress)
        return moments[..., :self.latent_channels] * self.scaling_factor

    def decode(self, z: np.ndarray, tile: int, overlap: int, tiles_per_call: int = 1, *,
               spill_dir: str | os.PathLike | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Scaled latents [B, h, w, 4] -> images [B, 8h, 8w, 3] clipped to [-1, 1] (float32) in windows of
        ``tile`` latent pixels overlapping by ``overlap``. ``spill_dir``, ``progress``: as :class:`StagedTiler`."""
        z = np.asarray(z, np.float32) / self.scaling_factor
        y = self._decoder(z, tile, overlap, tiles_per_call=tiles_per_call, spill_dir=spill_dir, progress=progress)
        return np.clip(y, -1.0, 1.0, out=y)

    def encode_estimate(self, shape: Sequence[int], tile: int, overlap: int,
                        tiles_per_call: int = 1) -> StagedEstimate:
        """:meth:`StagedTiler.estimate` of :meth:`encode` on images of ``shape`` (float32)."""
        tile, overlap = self._encode_tiles(tile, overlap)
        return self._encoder.estimate(shape, np.float32, tile, overlap, align=self.factor,
                                      tiles_per_call=tiles_per_call)

    def decode_estimate(self, shape: Sequence[int], tile: int, overlap: int,
                        tiles_per_call: int = 1) -> StagedEstimate:
        """:meth:`StagedTiler.estimate` of :meth:`decode` on latents of ``shape``."""
        return self._decoder.estimate(shape, np.float32, tile, overlap, tiles_per_call=tiles_per_call)

    def encode_temporaries(self, shape: Sequence[int], tile: int, overlap: int, tiles_per_call: int = 1) -> int | None:
        """:meth:`StagedTiler.temporaries` of :meth:`encode` on images of ``shape`` (compiles its stages)."""
        tile, overlap = self._encode_tiles(tile, overlap)
        return self._encoder.temporaries(shape, np.float32, tile, overlap, align=self.factor,
                                         tiles_per_call=tiles_per_call)

    def decode_temporaries(self, shape: Sequence[int], tile: int, overlap: int, tiles_per_call: int = 1) -> int | None:
        """:meth:`StagedTiler.temporaries` of :meth:`decode` on latents of ``shape`` (compiles its stages)."""
        return self._decoder.temporaries(shape, np.float32, tile, overlap, tiles_per_call=tiles_per_call)
