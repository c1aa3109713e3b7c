"""One-step SR restoration of image arrays of any size: the restorer, its tiling, colour fix and controls.

    from jsr.methods.restorer import load_restorer
    from jsr.sr.infer import RestoreOptions, upscale_bicubic
    r = load_restorer("sd21-base", ["export/student", "control=export/control"])
    sr = r(upscale_bicubic(lq, 4)[None], RestoreOptions(knobs={"t": 0.3}))      # [1, 4h, 4w, 3] in [0, 1]

This module is the method-agnostic machinery (the :class:`Restorer`: padding, tiling, colour fix);
:func:`jsr.methods.restorer.load_restorer` builds one from a registered method and its files, and
``python -m jsr.infer`` wraps that for files, folders and globs (:mod:`jsr.infer`).

The pipeline for a batch of same-size LQ images (NHWC):

1. **Upscale** the LQ by 4 (bicubic, :func:`upscale_bicubic`) to the output size: the generator's input, as
   OSEDiff feeds it (values in [0, 1], clipped after the bicubic overshoot). The caller does this step.
2. **Pad** to a multiple of 8 by mirror reflection (the VAE downsamples by 8); the output is cropped back, so any
   size goes in (37 x 53 LQ -> 148 x 212 SR).
3. **Encode** with the VAE (+ encoder LoRA), in pixel tiles of ``vae_tile`` when the image is larger; the
   posterior mean, so the output is deterministic. Tiles share whole-image GroupNorm statistics and the
   mid-block attention sees the whole image (``jsr.sr.staged_tiling``), so tiling costs only border context.
4. **The one step** in latent space (the method's ``forward`` with its knobs), in latent tiles of
   ``latent_tile`` with ``latent_overlap`` and Gaussian blending when the latent is larger. A method that also
   reads the LQ pixels there (``uses_image``) gets each tile's pixels: they travel with the latent as 192
   extra channels (8x8 pixels per latent), so one tiler cuts both identically.
5. **Decode** in latent tiles of ``vae_tile / 8``, tiled as the encoder; crop, map to [0, 1].
6. **Colour fix** against the upscaled LQ (AdaIN by default, as OSEDiff and CTSR; wavelet; none).

Tiling keeps device memory bounded (one batch of tiles at a time, blending or assembling on the host); its error
against a whole-image pass is discussed in :mod:`jsr.sr.tiling` (the latent step) and :mod:`jsr.sr.staged_tiling`
(the VAE). Host memory: the staged VAE holds every window's activations of a stage, which for a large image can be
far more than the machine has; ``RestoreOptions.max_memory`` makes :meth:`Restorer.plan` keep them in memory only
while they fit beside the image's own buffers, spill them to disk otherwise, and fall back to blended VAE tiles
when the disk has no room either. The plan and its estimate are printed when a size is first seen, and
``progress`` moves per tile and per VAE stage. What stays proportional to the image: its own float32 buffers (the
input, the output, the colour fix's temporaries: ~5 x 12 bytes per output pixel at the peak below 8.4 Mpx, ~2
above it, where the colour fix works in place band by band).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from jsr.console import compiling, notice
from jsr.sr import colorfix, tiling
from jsr.sr.speed import Phase, SpeedLog, describe_duration
from jsr.sr.staged_tiling import TiledVAE


def upscale_bicubic(img: np.ndarray, factor: float) -> np.ndarray:
    """Bicubic resize of [H, W, C] float [0, 1] by ``factor`` to ``(round(H f), round(W f))`` (PIL's bicubic,
    per channel in float so nothing is quantised), clipped to [0, 1]."""
    h, w = img.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return img.astype(np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32))
                        .resize(size, Image.BICUBIC)) for c in range(img.shape[-1])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """Per-run settings of :class:`Restorer` (sizes in pixels of the named space).

    Attributes:
      knobs: the method's controls by name (``{"t": 0.3}`` for CTSR, ``{"lambda_sem": 0.8}`` for PiSA-SR: see
        each method's ``knobs`` in :mod:`jsr.methods`); knobs not given take the model's defaults. A knob the
        restorer does not honour is refused (:func:`jsr.methods.restorer.check_options`).
      color_fix: ``adain``, ``wavelet`` or ``none``.
      latent_tile, latent_overlap: UNet tiles in latent pixels (the step runs whole when the latent fits).
      vae_tile, vae_overlap: VAE tiles in output pixels (encode: that many pixels; decode: / 8 latents);
        ``0`` = never tile the VAE. Each tile keeps half the overlap as context around the part it outputs:
        the default 176 px is 11 latents, Tiled-VAE's decoder padding. An overlap as large as the tile is
        clipped to leave one step of 8 pixels (1 latent).
      tiles_per_call: tiles batched into one call of the UNet / VAE.
      pad_multiple: pad the upscaled image to a multiple of this (8: the VAE's downsampling).
      max_memory: host memory in bytes the restorer plans each image size against (:meth:`Restorer.plan`): the
        VAE's staged tiles keep their carries in memory while they fit, else on disk under ``spill_dir``, else
        (no disk) the VAE runs as blended tiles; ``0`` = no budget (staged tiles in memory).
      spill_dir: where spilled carries go (default: the system's temporary folder).
      max_device_memory: device memory in bytes one call may use beside the parameters (its tiles' inputs and
        outputs, the whole-image arrays it reads, XLA's temporaries when measured): :meth:`Restorer.plan` shrinks
        ``tiles_per_call``, then ``vae_tile``, then ``latent_tile`` until the calls fit. ``0`` = the device's
        own free memory on a GPU/TPU (:func:`device_free_memory`), no device budget on a CPU (its memory is the
        host's: ``max_memory``).
    """

    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    color_fix: str = "adain"
    latent_tile: int = 96
    latent_overlap: int = 32
    vae_tile: int = 1024
    vae_overlap: int = 176
    tiles_per_call: int = 1
    pad_multiple: int = 8
    max_memory: int = 0
    spill_dir: str = ""
    max_device_memory: int = 0

    def __post_init__(self):
        if self.color_fix not in colorfix.METHODS:
            raise ValueError(f"color_fix must be one of {colorfix.METHODS}, got {self.color_fix!r}")
        if self.latent_tile < 8 or not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError(f"latent tile {self.latent_tile} must be >= 8 and overlap {self.latent_overlap} "
                             "in [0, tile)")
        if self.vae_tile and self.vae_tile < 64 or self.vae_overlap < 0:
            raise ValueError(f"vae tile {self.vae_tile} must be 0 (off) or >= 64 px, overlap {self.vae_overlap} "
                             ">= 0")
        if self.pad_multiple % 8:
            raise ValueError(f"pad_multiple must be a multiple of 8, got {self.pad_multiple}")
        if self.max_memory < 0:
            raise ValueError(f"max_memory must be >= 0 bytes (0: no budget), got {self.max_memory}")
        if self.max_device_memory < 0:
            raise ValueError(f"max_device_memory must be >= 0 bytes (0: the device's free memory), got "
                             f"{self.max_device_memory}")

    def with_knobs(self, **knobs: Any) -> "RestoreOptions":
        """A copy with ``knobs`` set (over the ones already set)."""
        return dataclasses.replace(self, knobs={**self.knobs, **knobs})


GB = 2 ** 30
VAE_MODES = ("whole", "staged", "spilled", "blended")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How :class:`Restorer` runs one input size, and what that needs (bytes, estimated from the shapes before
    any work: host arrays the restorer holds, not the parameters, XLA's temporaries or the runtime).

    Attributes:
      shape: the padded input ``[B, H, W, 3]``.
      encode, decode: how the VAE runs: ``whole`` (not tiled), ``staged`` (tiles with whole-image statistics,
        carries in memory), ``spilled`` (the same, carries on disk), ``blended`` (tiles with their own
        statistics, Gaussian-blended: the fall-back when neither fits).
      host: estimated peak host memory; ``disk``: what spilling writes at most.
      per_call: the largest tile call's input and output on one device (what a device holds besides
        parameters and temporaries; a call on several devices splits its tiles evenly).
      steps: progress steps (VAE stage calls, latent tiles).
      budget: ``max_memory`` (0: none); ``spill_dir``: where carries are spilled.
      phases: the steps by phase (``encode``, ``latent``, ``decode``: :class:`jsr.sr.speed.Phase`, what a time
        estimate multiplies).
      temporaries: XLA's temporary bytes of the largest staged VAE call (``memory_analysis`` of the compiled
        stage programs, when the restorer plans with them: :attr:`Restorer.plan_temporaries`; -1 when not
        measured). Device memory; on a CPU that is host memory, and ``host`` includes it.
      latent_temporaries: the same for the latent step's program (-1 when not measured).
      tiles: the tiling the run uses, ``(vae_tile, vae_overlap, latent_tile, latent_overlap, tiles_per_call)``: the
        options' own unless the device budget made them smaller (:meth:`Restorer.plan`).
      device_budget: bytes a call may use on its device (0: none); ``device``: the most a planned call needs
        there (inputs, outputs, whole-image arrays and the measured temporaries; not the parameters).
      fitted: what the device budget changed, for the console (``""``: nothing).
    """

    shape: tuple[int, ...]
    encode: str
    decode: str
    host: int
    disk: int
    per_call: int
    steps: int
    budget: int = 0
    spill_dir: str = ""
    phases: tuple[Phase, ...] = ()
    temporaries: int = -1
    latent_temporaries: int = -1
    tiles: tuple[int, ...] = ()
    device_budget: int = 0
    device: int = 0
    fitted: str = ""

    def options(self, opts: "RestoreOptions") -> "RestoreOptions":
        """``opts`` with the tiling this plan runs (:attr:`tiles`)."""
        if not self.tiles:
            return opts
        vae, vo, lt, lo, k = self.tiles
        return dataclasses.replace(opts, vae_tile=vae, vae_overlap=vo, latent_tile=lt, latent_overlap=lo,
                                   tiles_per_call=k)

    def describe(self) -> str:
        """One line for the console: the plan and the estimate."""
        b, h, w, _ = self.shape
        parts = [f"{b} x {w}x{h}: VAE encode {self.encode}, decode {self.decode}"]
        if "spilled" in (self.encode, self.decode):
            parts.append(f"{self.disk / GB:.2f} GB spilled to {self.spill_dir or tempfile.gettempdir()}")
        est = f"host memory ~{self.host / GB:.2f} GB"
        if self.budget:
            est += f" of the {self.budget / GB:.2f} GB budget" + (" (over it: the image's own buffers need that "
                                                                   "much)" if self.host > self.budget else "")
        parts.append(est)
        call = f"{self.per_call / 2**20:.0f} MB per tile call and device"
        temps = max(self.temporaries, self.latent_temporaries)
        if temps >= 0:
            call += f" + {temps / 2**20:.0f} MB of XLA temporaries"
        parts.append(f"{call}; {self.steps} steps")
        if self.device_budget:
            dev = (f"device ~{self.device / GB:.2f} GB per call of the {self.device_budget / GB:.2f} GB device budget"
                   + (" (over it even at the smallest tiles)" if self.device > self.device_budget else ""))
            parts.append(dev + (f" ({self.fitted})" if self.fitted else ""))
        return "; ".join(parts)


EncodeFn = Callable[[Any], Any]  # [n, H, W, 3] in [-1, 1] -> [n, H/8, W/8, 4] scaled latents
LatentFn = Callable[[Any, "RestoreOptions"], Any]  # ([n, h, w, 4 (+192)], options: the knobs) -> [n, h, w, 4]
DecodeFn = Callable[[Any], Any]  # [n, h, w, 4] -> [n, 8h, 8w, 3] in [-1, 1]


@dataclasses.dataclass
class Restorer:
    """A one-step restorer as three maps (each jitted, parameters bound) plus its method name.

    Build one from checkpoints with :func:`jsr.methods.restorer.load_restorer`; tests build one from stand-in
    callables. ``knobs`` names the controls (:attr:`RestoreOptions.knobs`) the latent step honours and
    ``knob_defaults`` their values when not given (a method's defaults, or an export's). ``tiled_vae`` runs the
    VAE on large images (:class:`jsr.sr.staged_tiling.TiledVAE`); without one (stand-in maps)
    ``encode``/``decode`` are tiled by blending (``jsr.sr.tiling``), exact only for local maps. ``uses_image``:
    the latent step also reads the LQ pixels (see the module docstring, step 4). ``label``: the model's name in
    tables (default: the method name). ``context``: ``(x [B, H, W, 3] in [-1, 1], options) -> ctx``, computed
    once on the whole (padded) images and passed to ``latent(z, options, ctx)`` for every tile (a method whose
    cross-attention context comes from the image); ``None``: ``latent(z, options)``. ``devices``: how many
    devices the maps split each batch over (:mod:`jsr.sr.data_parallel`); ``tiles_per_call`` is then rounded up
    to a multiple of it (:meth:`device_options`), so every device gets as many tiles per call as one device
    would with the option as given. ``speed``: a :class:`jsr.sr.speed.SpeedLog` that every call records its
    timings in and the plan line takes a time estimate from, keyed by ``profile`` (what changes a call's cost:
    base, method and trees, dtype, attention, devices); ``None``: no timing kept. ``plan_temporaries``: plans of
    staged VAE runs compile the stage programs first (the run reuses them) and count XLA's temporaries
    (:attr:`MemoryPlan.temporaries`; the command lines turn it on, tests of the plan alone leave it off).
    ``needs_image(knobs)``: whether a ``uses_image`` latent step reads the pixels at these knob values (the
    method's ``needs_image``; LFIM methods with both gains off do not): when False the pixels stay out of the
    tiled latent and the step gets ``z`` [n, h, w, 4] alone. ``latent_memory((n, h, w), channels, opts, shape)``:
    XLA's temporary bytes of the latent step's program on a call of ``n`` tiles ``h x w`` with ``channels``
    (4, or 4 + the pixels) for padded images of ``shape`` (compiles it, as the run's first call would; None when
    it cannot be told); planned with when :attr:`plan_temporaries` is on. ``whole_memory(shape)``: the same for
    the untiled VAE programs on padded images of ``shape`` (images that fit one VAE tile).
    """

    encode: EncodeFn
    latent: LatentFn
    decode: DecodeFn
    method: str = "osediff"
    knobs: tuple[str, ...] = ()
    factor: int = 8  # VAE downsampling
    tiled_vae: TiledVAE | None = None
    knob_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uses_image: bool = False
    label: str = ""
    context: Callable[[Any, "RestoreOptions"], Any] | None = None
    devices: int = 1
    profile: str = ""
    speed: SpeedLog | None = None
    plan_temporaries: bool = False
    needs_image: Callable[[Mapping[str, Any]], bool] | None = None
    latent_memory: Callable[..., int | None] | None = None
    whole_memory: Callable[[tuple[int, ...]], int | None] | None = None
    # Caches, per instance: init=False so that dataclasses.replace (a restorer with another tiled_vae, say)
    # starts with empty ones instead of sharing plans made for the original.
    _sizes_seen: set = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)
    _plans: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _announced: set = dataclasses.field(default_factory=set, init=False, repr=False, compare=False)
    _measured_temps: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # The last call's seconds per progress step by phase, and whether it met a new size (so compiled).
    last_timing: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    last_compiled: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __call__(self, x_up: np.ndarray, opts: RestoreOptions = RestoreOptions(),
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Restore a batch of upscaled LQ images [B, H, W, 3] in [0, 1] (any H, W) -> SR [B, H, W, 3] in [0, 1]
        (float32, numpy). ``progress(n)`` is called as tiles and VAE stages complete (:attr:`MemoryPlan.steps`
        in all). A new size is announced with its plan (:meth:`plan`) before any work."""
        x_up = np.asarray(x_up, np.float32)
        opts = self.device_options(opts)
        if x_up.ndim != 4 or x_up.shape[-1] != 3:
            raise ValueError(f"restorer wants NHWC RGB images [B, H, W, 3], got shape {x_up.shape}")
        padded, size = tiling.pad_to_multiple(x_up, max(self.factor, opts.pad_multiple))
        key = (padded.shape, opts.latent_tile, opts.vae_tile, opts.tiles_per_call, opts.max_memory,
               opts.max_device_memory)
        self.last_compiled = key not in self._sizes_seen
        if self.last_compiled:  # a new size compiles what it needs: minutes for a real model on a CPU
            self._announce(padded.shape)
        plan = self.plan(padded.shape, opts)
        opts = plan.options(opts)  # the tiles the plan chose (smaller than asked when the device budget says so)
        clock = _StepClock(progress)
        self.last_timing = clock.timing
        if self.last_compiled:
            self._sizes_seen.add(key)
            if opts.max_memory or "whole" not in (plan.encode, plan.decode):
                notice("plan: " + plan.describe() + ("" if self.speed is None else "; " + self.time_note(plan)))
        # [-1, 1], in place where padding made a copy (the caller's array is never written); the padded copy is
        # not kept beside it: at 8000x6000 every image-sized float32 buffer is 576 MB.
        x = padded if padded is not x_up else np.array(padded)
        x *= 2.0
        x -= 1.0
        del padded
        z = self._encode(x, opts, plan.encode, clock.phase("encode"))
        if self._with_image(opts):  # the pixels under each latent travel with it through the tiler (8x8 -> 192)
            b, h, w, _ = z.shape
            f = self.factor
            px = x.reshape(b, h, f, w, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, f * f * 3)
            z = np.concatenate([z, px.astype(np.float32)], axis=-1)
            del px
        if self.context is None:
            step = lambda zt: self.latent(zt, opts)  # noqa: E731
        else:
            ctx = self.context(x, opts)
            step = lambda zt: self.latent(zt, opts, ctx)  # noqa: E731
        del x
        z = tiling.tiled_map(step, z, opts.latent_tile, opts.latent_overlap, tiles_per_call=opts.tiles_per_call,
                             progress=clock.phase("latent"))
        y = self._decode(z, opts, plan.decode, clock.phase("decode"))
        if not y.flags.writeable:  # a view of a device buffer (untiled decode): small, copy it
            y = np.array(y)
        y = tiling.crop_to(y, size)
        np.clip(y, -1.0, 1.0, out=y)
        y += 1.0
        y /= 2.0
        if self.speed is not None:
            self.speed.record(self.profile, plan.phases, clock.timing, compiled=self.last_compiled)
        if y.shape[1] * y.shape[2] >= colorfix.BANDED_FROM:  # large: in place, band by band (two images' memory)
            for i in range(len(y)):
                colorfix.color_fix_inplace(y[i:i + 1], x_up[i:i + 1], opts.color_fix)
            return y
        if len(y) == 1:
            return np.asarray(colorfix.color_fix(y, x_up, opts.color_fix, clip=True), np.float32)
        # Image by image: XLA's CPU reductions round differently at another batch size, and an image's colours
        # should not depend on what it was batched with (or on how many devices split the batch).
        return np.concatenate([np.asarray(colorfix.color_fix(y[i:i + 1], x_up[i:i + 1], opts.color_fix, clip=True),
                                          np.float32) for i in range(len(y))])

    def _with_image(self, opts: RestoreOptions) -> bool:
        """Whether the latent step gets the LQ pixels at ``opts``' knobs (:attr:`needs_image`)."""
        if not self.uses_image:
            return False
        return self.needs_image is None or bool(self.needs_image({**self.knob_defaults, **opts.knobs}))

    def _announce(self, shape: Sequence[int]) -> None:
        """The compiling notice for padded size ``shape``, once (planning with temporaries compiles too)."""
        b, h, w = (int(v) for v in shape[:3])
        if (b, h, w) not in self._announced:
            self._announced.add((b, h, w))
            compiling(f"the {self.method} restorer for {b} x {w}x{h} images")

    def estimate_seconds(self, plan: MemoryPlan) -> float | None:
        """Seconds the model calls of ``plan`` take, from :attr:`speed`'s timings of this restorer's
        configuration (:attr:`profile`) on this machine; None without a log or a timing of every phase."""
        return None if self.speed is None else self.speed.estimate(self.profile, plan.phases)

    def time_note(self, plan: MemoryPlan) -> str:
        """``time ~3 min 20 s ...`` for the plan line, or why there is no estimate yet."""
        seconds = self.estimate_seconds(plan)
        if seconds is None:
            return ("time: no estimate yet (this model's calls at this size have not been timed on this machine; "
                    "the next run will know)")
        return f"time {describe_duration(seconds)} of model calls (timed on an earlier run here), compiling aside"

    def device_options(self, opts: RestoreOptions) -> RestoreOptions:
        """``opts`` with ``tiles_per_call`` rounded up to a multiple of :attr:`devices` (a call's tiles are
        split over the devices: 1 tile per call on 4 devices would leave 3 idle)."""
        d = max(1, int(self.devices))
        k = -(-max(1, opts.tiles_per_call) // d) * d
        return opts if k == opts.tiles_per_call else dataclasses.replace(opts, tiles_per_call=k)

    def _vae_tiles(self, opts: RestoreOptions) -> tuple[int, int]:
        """The decoder's tile and overlap in latent pixels."""
        tile = max(1, opts.vae_tile // self.factor)
        return tile, min(tile - 1, -(-opts.vae_overlap // self.factor))

    def plan(self, shape: Sequence[int], opts: RestoreOptions = RestoreOptions()) -> MemoryPlan:
        """How a call on a padded input of ``shape`` [B, H, W, 3] runs under ``opts.max_memory`` and what it
        needs (:class:`MemoryPlan`). First the tiles: under a device budget (:meth:`device_budget`) calls that
        do not fit get fewer tiles per call (down to one per device), then smaller VAE tiles (by quarters, down
        to 128 px; the overlap at most half the tile), then smaller latent tiles (overlap scaled alike, not below 16
        latents); the plan's :attr:`MemoryPlan.tiles` are what the run uses. Then per VAE direction: ``whole``
        when the image fits one tile (never tiled); else ``staged`` when its carries fit the host budget beside
        the image buffers (or there is no budget), ``spilled`` when they do not and the spill folder has room,
        else ``blended``. Planned once per size and options (tracing the full VAE's stages takes seconds)."""
        opts = self.device_options(opts)
        key = (tuple(int(v) for v in shape), opts.vae_tile, opts.vae_overlap, opts.latent_tile, opts.latent_overlap,
               opts.tiles_per_call, opts.max_memory, opts.spill_dir, self._with_image(opts), opts.max_device_memory)
        if key not in self._plans:
            if self.plan_temporaries:
                self._announce(shape)
            budget = self.device_budget(opts)
            run, fitted, device = opts, "", 0
            if budget:
                run, fitted, device = self._fit(shape, opts, budget)
            plan = self._plan(shape, run)
            if self.devices > 1:  # a call's tiles are split evenly (tiles_per_call is a multiple of devices)
                plan = dataclasses.replace(plan, per_call=plan.per_call // self.devices)
            self._plans[key] = dataclasses.replace(
                plan, tiles=(run.vae_tile, run.vae_overlap, run.latent_tile, run.latent_overlap, run.tiles_per_call),
                device_budget=budget, device=device, fitted=fitted)
        return self._plans[key]

    def plan_input(self, shape: Sequence[int], opts: RestoreOptions = RestoreOptions()) -> MemoryPlan:
        """:meth:`plan` for an unpadded input of ``shape`` [B, H, W, 3] (what ``__call__`` pads it to)."""
        m = max(self.factor, opts.pad_multiple)
        b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        return self.plan((b, h + -h % m, w + -w % m, 3), opts)

    def device_budget(self, opts: RestoreOptions) -> int:
        """Bytes one call may use on its device: ``opts.max_device_memory``, else the device's free memory on a
        GPU/TPU (:func:`device_free_memory`), else 0 (no device budget: a CPU's memory is the host's)."""
        return int(opts.max_device_memory) or device_free_memory()

    def _latent_call(self, shape: Sequence[int], opts: RestoreOptions) -> tuple[tuple[int, int, int], int]:
        """The latent step's call shape ``(n, h, w)`` and its input channels on padded images of ``shape``."""
        b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        latent = (b, h // self.factor, w // self.factor, 4)
        call = tiling.call_shape(latent, opts.latent_tile, opts.latent_overlap, 1, opts.tiles_per_call)
        return call, 4 + (3 * self.factor ** 2 if self._with_image(opts) else 0)

    def _latent_temporaries(self, shape: Sequence[int], opts: RestoreOptions) -> int:
        """XLA's temporaries of the latent step's program at ``opts``' tiles (-1: not measured), per call shape."""
        if not (self.plan_temporaries and self.latent_memory is not None and self.devices == 1):
            return -1
        call, channels = self._latent_call(shape, opts)
        key = (call, channels, tuple(sorted((k, repr(v)) for k, v in opts.knobs.items())), tuple(shape))
        if key not in self._measured_temps:
            got = self.latent_memory(call, channels, opts, tuple(int(v) for v in shape))
            self._measured_temps[key] = -1 if got is None else int(got)
        return self._measured_temps[key]

    def _device_needs(self, shape: Sequence[int], opts: RestoreOptions, budget: int,
                      guess: dict) -> tuple[int, int]:
        """``(VAE, latent)``: the most one call of each needs on its device at ``opts``' tiles (bytes; the
        parameters aside). XLA's temporaries are measured (compiling) only when :attr:`plan_temporaries` is on
        and the carries alone leave room; a measurement is scaled by the window area to skip tiles that clearly
        cannot fit (``guess`` keeps the last one)."""
        b, h, w, _ = (int(v) for v in shape)
        d = max(1, int(self.devices))
        vae = 0
        if self.tiled_vae is not None:
            # A tile of 0 (never tile) or one covering the image: the window is the image.
            vt = opts.vae_tile or max(h, w)
            dec_tile, dec_overlap = self._vae_tiles(dataclasses.replace(opts, vae_tile=vt))
            latent = (b, h // self.factor, w // self.factor, 4)
            enc = self.tiled_vae.encode_estimate((b, h, w, 3), vt, opts.vae_overlap, opts.tiles_per_call)
            dec = self.tiled_vae.decode_estimate(latent, dec_tile, dec_overlap, opts.tiles_per_call)
            carries = max(e.device - e.per_call + e.per_call // d for e in (enc, dec))
            area = enc.window[0] * enc.window[1] * enc.window[2]
            temps = 0
            whole = not opts.vae_tile or max(h, w) <= opts.vae_tile  # the untiled programs run
            if whole and self.plan_temporaries and carries <= budget:
                if self.whole_memory is not None and self.devices == 1:
                    key = ("whole", b, h, w)
                    if key not in self._measured_temps:
                        got = self.whole_memory((b, h, w, 3))
                        self._measured_temps[key] = 0 if got is None else int(got)
                    temps = self._measured_temps[key]
            elif self.plan_temporaries and carries <= budget:
                predicted = guess["vae"][1] * area / guess["vae"][0] if "vae" in guess else 0
                if carries + predicted > 1.25 * budget:
                    temps = int(predicted)
                else:
                    temps = max(0, max(self.tiled_vae.encode_temporaries((b, h, w, 3), vt, opts.vae_overlap,
                                                                         opts.tiles_per_call) or 0,
                                       self.tiled_vae.decode_temporaries(latent, dec_tile, dec_overlap,
                                                                         opts.tiles_per_call) or 0))
                    guess["vae"] = (area, temps)
            vae = carries + temps
        (n, th, tw), channels = self._latent_call(shape, opts)
        io = n * th * tw * (channels + 4) * 4 // d
        temps = max(0, self._latent_temporaries(shape, opts)) if io <= budget else 0
        return vae, io + temps

    def _fit(self, shape: Sequence[int], opts: RestoreOptions, budget: int) -> tuple[RestoreOptions, str, int]:
        """``(options with tiles that fit budget, what changed, the most a call then needs)`` (:meth:`plan`)."""
        d = max(1, int(self.devices))
        guess: dict = {}
        vae, lat = self._device_needs(shape, opts, budget, guess)
        run = opts
        if run.tiles_per_call > d and max(vae, lat) > budget:
            run = dataclasses.replace(run, tiles_per_call=d)
            vae, lat = self._device_needs(shape, run, budget, guess)
        h, w = int(shape[1]), int(shape[2])
        tile = run.vae_tile or max(h, w)
        while vae > budget and tile > 128:
            # By quarters (multiples of 64); the overlap at most half the tile, or windows would mostly repeat.
            tile = max(128, min(tile, max(h, w)) * 3 // 4 // 64 * 64)
            run = dataclasses.replace(run, vae_tile=tile, vae_overlap=min(opts.vae_overlap, tile // 2 // 8 * 8))
            vae, lat = self._device_needs(shape, run, budget, guess)
        while lat > budget and run.latent_tile > 16:
            lt = max(16, run.latent_tile * 3 // 4 // 8 * 8)
            lo = min(opts.latent_overlap * lt // opts.latent_tile, lt - 8)
            run = dataclasses.replace(run, latent_tile=lt, latent_overlap=lo)
            vae, lat = self._device_needs(shape, run, budget, guess)
        changed = [f"{what} {a} -> {z}" for what, a, z in (
            ("tiles per call", opts.tiles_per_call, run.tiles_per_call), ("VAE tile", opts.vae_tile, run.vae_tile),
            ("VAE overlap", opts.vae_overlap, run.vae_overlap), ("UNet tile", opts.latent_tile, run.latent_tile))
            if a != z]
        return run, ", ".join(changed), max(vae, lat)

    def _plan(self, shape: Sequence[int], opts: RestoreOptions) -> MemoryPlan:
        b, h, w, _ = (int(v) for v in shape)
        f = self.factor
        image = b * h * w * 3 * 4  # one float32 image-sized buffer
        latent = (b, h // f, w // f, 4)
        lt_steps = tiling.tile_calls(latent, opts.latent_tile, opts.latent_overlap, 1, opts.tiles_per_call)
        spill_dir = opts.spill_dir or tempfile.gettempdir()
        budget = int(opts.max_memory)
        tiled = bool(opts.vae_tile) and max(h, w) > opts.vae_tile
        dec_tile, dec_overlap = self._vae_tiles(opts)
        # Host buffers outside the VAE by phase: the caller's image and x while encoding; with the LQ pixels
        # beside the latent (uses_image) while stepping; the output and colour fix's temporaries at the end.
        enc_fixed, dec_fixed = 2 * image, image
        step_fixed = 2 * image + (2 * image if self._with_image(opts) else 0)
        lt_temps = self._latent_temporaries(shape, opts)
        if jax.default_backend() == "cpu":  # the step program's working memory is host memory here
            step_fixed += max(0, lt_temps)
        # The colour fix: whole-image programs below colorfix.BANDED_FROM pixels, in place by bands above it.
        fix_peak = 5 * image if h * w < colorfix.BANDED_FROM else 2 * image + image // 8
        lt_phase = Phase("latent", "tiles", lt_steps, 1,
                         tiling.call_shape(latent, opts.latent_tile, opts.latent_overlap, 1, opts.tiles_per_call))
        if not tiled:
            phases = (Phase("encode", "whole", 1, 1, (b, h, w)), lt_phase, Phase("decode", "whole", 1, 1, latent[:3]))
            return MemoryPlan((b, h, w, 3), "whole", "whole", max(enc_fixed, step_fixed, dec_fixed + image, fix_peak),
                              0, 0, 2 + lt_steps, budget, opts.spill_dir, phases, latent_temporaries=lt_temps)
        # Calls of blended VAE tiles (tiling.tiled_encode's rounding of the tile and overlap to whole latents).
        enc_tile, enc_overlap = max(f, opts.vae_tile - opts.vae_tile % f), -(-opts.vae_overlap // f) * f
        enc_blended = tiling.tile_calls((b, h, w, 3), enc_tile, enc_overlap, f, opts.tiles_per_call)
        dec_blended = tiling.tile_calls(latent, dec_tile, dec_overlap, 1, opts.tiles_per_call)
        blended = {"encode": Phase("encode", "blended", enc_blended, 1, tiling.call_shape(
                       (b, h, w, 3), enc_tile, enc_overlap, f, opts.tiles_per_call)),
                   "decode": Phase("decode", "blended", dec_blended, 1, tiling.call_shape(
                       latent, dec_tile, dec_overlap, 1, opts.tiles_per_call))}
        if self.tiled_vae is None:  # stand-in maps: blended tiles, one tile at a time
            steps = enc_blended + lt_steps + dec_blended
            return MemoryPlan((b, h, w, 3), "blended", "blended",
                              max(enc_fixed, step_fixed, dec_fixed + image + image // 3, fix_peak), 0, 0, steps,
                              budget, opts.spill_dir, (blended["encode"], lt_phase, blended["decode"]),
                              latent_temporaries=lt_temps)
        enc = self.tiled_vae.encode_estimate((b, h, w, 3), opts.vae_tile, opts.vae_overlap, opts.tiles_per_call)
        dec = self.tiled_vae.decode_estimate(latent, dec_tile, dec_overlap, opts.tiles_per_call)
        temps = [-1, -1]
        if self.plan_temporaries:
            temps = [self.tiled_vae.encode_temporaries((b, h, w, 3), opts.vae_tile, opts.vae_overlap,
                                                       opts.tiles_per_call),
                     self.tiled_vae.decode_temporaries(latent, dec_tile, dec_overlap, opts.tiles_per_call)]
            temps = [-1 if t is None else t for t in temps]
        # XLA's temporaries live beside the carries: in host memory on a CPU, on the accelerator elsewhere.
        on_host = [max(0, t) if jax.default_backend() == "cpu" else 0 for t in temps]
        free = _free_disk(spill_dir)
        used_disk = 0

        def choose(est, fixed: int, temp: int, blended_extra: int) -> tuple[str, int]:
            nonlocal used_disk
            if not budget or fixed + temp + est.in_memory <= budget:
                return "staged", fixed + temp + est.in_memory
            if free >= 1.1 * est.disk:
                used_disk = max(used_disk, est.disk)
                return "spilled", fixed + temp + est.spilled
            return "blended", fixed + est.per_call + blended_extra

        enc_mode, enc_peak = choose(enc, enc_fixed, on_host[0], 0)
        dec_mode, dec_peak = choose(dec, dec_fixed, on_host[1], image + image // 3)
        steps = (enc.calls if enc_mode != "blended" else enc_blended) + lt_steps + (
            dec.calls if dec_mode != "blended" else dec_blended)

        def staged_phase(name: str, mode: str, est) -> Phase:
            return blended[name] if mode == "blended" else Phase(name, mode, est.calls, est.stages, est.window)

        phases = (staged_phase("encode", enc_mode, enc), lt_phase, staged_phase("decode", dec_mode, dec))
        temporaries = max([t for t, mode in zip(temps, (enc_mode, dec_mode)) if mode != "blended"], default=-1)
        return MemoryPlan((b, h, w, 3), enc_mode, dec_mode, max(enc_peak, step_fixed, dec_peak, fix_peak),
                          used_disk, max(enc.per_call, dec.per_call), steps, budget, opts.spill_dir, phases,
                          temporaries, lt_temps)

    def _encode(self, x: np.ndarray, opts: RestoreOptions, mode: str,
                progress: Callable[[int], None] | None) -> np.ndarray:
        if mode == "whole":  # one tile: the whole-image program
            z = np.asarray(self.encode(x), np.float32)
            if progress is not None:
                progress(1)
            return z
        if mode in ("staged", "spilled"):
            spill = (opts.spill_dir or tempfile.gettempdir()) if mode == "spilled" else None
            return self.tiled_vae.encode(x, opts.vae_tile, opts.vae_overlap, opts.tiles_per_call, spill_dir=spill,
                                         progress=progress)
        return tiling.tiled_encode(self.encode, x, opts.vae_tile, opts.vae_overlap, opts.tiles_per_call,
                                   self.factor, progress=progress)

    def _decode(self, z: np.ndarray, opts: RestoreOptions, mode: str,
                progress: Callable[[int], None] | None) -> np.ndarray:
        if mode == "whole":
            y = np.asarray(self.decode(z), np.float32)
            if progress is not None:
                progress(1)
            return y
        tile, overlap = self._vae_tiles(opts)
        if mode in ("staged", "spilled"):
            spill = (opts.spill_dir or tempfile.gettempdir()) if mode == "spilled" else None
            return self.tiled_vae.decode(z, tile, overlap, opts.tiles_per_call, spill_dir=spill, progress=progress)
        return tiling.tiled_decode(self.decode, z, tile, overlap, opts.tiles_per_call, self.factor,
                                   progress=progress)


def device_free_memory(device: jax.Device | None = None) -> int:
    """Bytes a restorer may plan a call against on ``device`` (default: the first local one): 90 % of what its
    runtime reports free (``memory_stats``: ``bytes_limit - bytes_in_use``, the parameters already loaded); 0 on
    a CPU (its memory is the host's) or when the runtime does not report it."""
    dev = device if device is not None else jax.local_devices()[0]
    if dev.platform == "cpu":
        return 0
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a runtime without memory statistics: no automatic budget
        return 0
    if "bytes_limit" not in stats:
        return 0
    return max(0, int(0.9 * (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))))


class _StepClock:
    """Times a restore's progress steps by phase: each step's seconds since the phase's previous step (or its
    start), forwarded to ``progress``. ``timing``: ``{phase: [seconds per step, ...]}``."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress = progress
        self.timing: dict[str, list[float]] = {}

    def phase(self, name: str) -> Callable[[int], None]:
        """The progress callback of phase ``name``, its clock started now."""
        durations = self.timing.setdefault(name, [])
        last = time.perf_counter()

        def step(n: int = 1) -> None:
            nonlocal last
            now = time.perf_counter()
            durations.extend([(now - last) / max(1, n)] * max(1, n))
            last = now
            if self.progress is not None:
                self.progress(n)

        return step


def _free_disk(folder: str) -> int:
    """Free bytes where ``folder`` lies (0 when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0
