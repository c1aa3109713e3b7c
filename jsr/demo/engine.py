"""What the demo page does, without the page: check an input, estimate its cost, restore, sweep a knob.

:class:`DemoEngine` wraps one :class:`jsr.sr.infer.Restorer` (any method, from
:func:`jsr.methods.restorer.load_restorer`) and the run's :class:`jsr.sr.infer.RestoreOptions`. It reads images
with jsr's own reader and restores them exactly as ``python -m jsr.infer`` does (bicubic pre-upscale, the same
options), so a demo result equals the command line's. Everything a person can get wrong (a file that is not an
image, an image over the size limit, a knob out of range, an upscale that is not positive) raises
:class:`DemoInputError` with one line the page shows.

Compiled programs: the restorer's maps are jitted once per process and cached per input shape by JAX; knobs are
traced arguments, so a new knob value reuses the program (a ``static`` knob is the exception, and its controls say
so). Each result says how much of its time went to compiling (:mod:`jsr.demo.compile_meter`), and the persistent
compilation cache (``jsr.cli.enable_compilation_cache``) keeps the programs for the next start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jsr.data.images import BadImageError, image_size, read_image, to_uint8, write_image
from jsr.demo.compile_meter import CompileSpan
from jsr.demo.controls import Control, controls_for, sweep_values
from jsr.methods.restorer import check_options
from jsr.sr.infer import Restorer, RestoreOptions, upscale_bicubic

# The EXIF Software tag of the files the demo offers for download (jsr.infer marks its outputs the same way).
OUTPUT_MARKER = "jsr.demo"
MIN_UPSCALE, MAX_UPSCALE = 1.0, 16.0
KEEP_RESULTS = 8  # result folders kept for download; older ones are deleted


class DemoInputError(ValueError):
    """An input the demo refuses; the message is one line for the page."""


@dataclasses.dataclass
class Result:
    """One restoration.

    Attributes:
      lq_up: the bicubic-upscaled input [H, W, 3] float32 in [0, 1] (what the model started from).
      sr: the output [H, W, 3] float32 in [0, 1].
      path: the full-size PNG written for download.
      seconds: wall time of the restore (reading the file excluded); ``compile_seconds``: the part of it JAX
        spent tracing and compiling (0 when the program was already compiled); ``programs``: how many programs
        it compiled (or read from the persistent cache).
      summary: one line for the page.
    """

    lq_up: np.ndarray
    sr: np.ndarray
    path: Path
    seconds: float
    compile_seconds: float
    programs: int
    summary: str


@dataclasses.dataclass
class Speed:
    """A measured restore: output pixels and seconds without compiling; the estimates scale it by pixels."""

    pixels: int
    seconds: float


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


class DemoEngine:
    """One model behind the demo page (see the module docstring).

    Args:
      restorer: the model.
      options: tiling, colour fix and knob values the run starts from (the command line's).
      knob_overrides: the command line's ``--<knob>`` values: the controls' initial values.
      max_pixels: the largest output (width x height after the upscale) the demo restores.
      out_dir: where result PNGs are written (the last :data:`KEEP_RESULTS` are kept).
      model_name: how the page names the model (``tiny``, the folder...).
    """

    def __init__(self, restorer: Restorer, options: RestoreOptions, *, out_dir: str | Path,
                 knob_overrides: Mapping[str, Any] | None = None, max_pixels: int = 4096 * 4096,
                 model_name: str = ""):
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        # Knobs move live here: the pixels always travel with the latent (needs_image off), so that turning an
        # LFIM gain on reuses the compiled step instead of compiling the pixel-reading one (the demo's images are
        # small; the memory this costs matters only for the command lines' large images).
        self.restorer = dataclasses.replace(restorer, needs_image=None) if restorer.uses_image else restorer
        self.options = options
        self.max_pixels = int(max_pixels)
        self.model_name = model_name
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        overrides = {**options.knobs, **(knob_overrides or {})}
        self.controls: list[Control] = controls_for(restorer.knobs, restorer.knob_defaults, overrides)
        self._by_name = {c.name: c for c in self.controls}
        self._lock = threading.Lock()  # one restore at a time: they share the device, and compile timing is global
        self._speed: Speed | None = None
        self._first_compile: float | None = None
        self._compiled: set[tuple] = set()
        self._runs = 0

    # -- inputs ----------------------------------------------------------------------------------------------------

    def control(self, name: str) -> Control:
        """The control of knob ``name`` (KeyError for a knob the model does not honour)."""
        return self._by_name[name]

    def options_for(self, color_fix: str | None = None, knobs: Mapping[str, Any] | None = None) -> RestoreOptions:
        """The run's options with ``color_fix`` and the ``knobs`` values set, each parsed and range-checked.

        Raises DemoInputError naming the knob and its range, or a knob this model does not have."""
        values = {}
        for name, value in (knobs or {}).items():
            if name not in self._by_name:
                have = ", ".join(self._by_name) or "none"
                raise DemoInputError(f"this {self.restorer.method} model has no knob {name!r} (its knobs: {have})")
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DemoInputError(f"{name}: no value given")
            try:
                values[name] = self._by_name[name].knob.parse(value)
            except ValueError as e:
                raise DemoInputError(str(e).lstrip("-")) from None
        try:
            opts = dataclasses.replace(self.options, color_fix=color_fix or self.options.color_fix,
                                       knobs={**self.options.knobs, **values})
            check_options(self.restorer, opts)
        except ValueError as e:
            raise DemoInputError(str(e)) from None
        return opts

    @staticmethod
    def check_upscale(upscale: Any) -> float:
        """``upscale`` as a float in [:data:`MIN_UPSCALE`, :data:`MAX_UPSCALE`], else DemoInputError."""
        try:
            f = float(upscale)
        except (TypeError, ValueError):
            raise DemoInputError(f"upscale must be a number, got {upscale!r}") from None
        if not MIN_UPSCALE <= f <= MAX_UPSCALE:
            raise DemoInputError(f"upscale must be in [{MIN_UPSCALE:g}, {MAX_UPSCALE:g}], got {f:g}")
        return f

    def output_size(self, path: str | Path, upscale: Any, name: str | None = None) -> tuple[int, int, int, int]:
        """``(h, w, H, W)``: the input's size from its header and the output's after ``upscale`` (as
        :func:`jsr.sr.infer.upscale_bicubic` rounds it). Raises DemoInputError for a file that is not an image
        (named ``name``, not by its upload path) or an output over ``max_pixels``."""
        f = self.check_upscale(upscale)
        try:
            h, w = image_size(path)
        except BadImageError as e:
            raise DemoInputError(self._named(e, path, name)) from None
        H, W = max(1, round(h * f)), max(1, round(w * f))
        if H * W > self.max_pixels:
            raise DemoInputError(f"{name or Path(path).name}: {w}x{h} x{f:g} would be a {W}x{H} output "
                                 f"({_mp(H * W)}), over this demo's limit of {_mp(self.max_pixels)} "
                                 "(--max_pixels); use a smaller image or upscale")
        return h, w, H, W

    def read(self, path: str | Path, name: str | None = None) -> np.ndarray:
        """The image at ``path`` as float32 [h, w, 3] in [0, 1] (jsr's reader); DemoInputError when it is not
        one."""
        try:
            return read_image(path)
        except BadImageError as e:
            raise DemoInputError(self._named(e, path, name)) from None

    @staticmethod
    def _named(error: Exception, path: str | Path, name: str | None) -> str:
        """``error``'s message with the upload's temporary path replaced by the file's own name."""
        text = " ".join(str(error).split())
        return text.replace(str(path), name) if name else text

    # -- estimates -------------------------------------------------------------------------------------------------

    def _key(self, shape: Sequence[int], opts: RestoreOptions) -> tuple:
        """What a compiled set of programs depends on: the padded input shape, the tiling options and the static
        knob values."""
        m = max(self.restorer.factor, opts.pad_multiple)
        b, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        static = tuple((c.name, opts.knobs.get(c.name, c.value)) for c in self.controls if c.recompiles)
        return ((b, h + -h % m, w + -w % m), opts.latent_tile, opts.latent_overlap, opts.vae_tile, opts.vae_overlap,
                opts.tiles_per_call, opts.max_memory, opts.max_device_memory, static)

    def estimate(self, path: str | Path, upscale: Any, name: str | None = None,
                 opts: RestoreOptions | None = None) -> str:
        """Markdown for the page, before any work: input and output sizes, how the restorer will tile the image
        (:meth:`jsr.sr.infer.Restorer.plan_input`), host memory, and the time scaled by output pixels from the largest
        measured restore (compile time left out), with a note when this size has to compile first.

        Raises DemoInputError as :meth:`output_size` does (not an image, over the size limit)."""
        opts = opts or self.options
        h, w, H, W = self.output_size(path, upscale, name)
        plan = self.restorer.plan_input((1, H, W, 3), opts)
        lines = [f"**{name or Path(path).name}**: {w}x{h} → **{W}x{H}** output ({_mp(H * W)}; the limit is "
                 f"{_mp(self.max_pixels)})"]
        tiled = plan.encode != "whole" or plan.steps > 3  # an untiled plan: encode, one latent step, decode
        if tiled:
            lines.append(f"Tiled: UNet in latent tiles of {opts.latent_tile} ({opts.latent_tile * 8} px, overlap "
                         f"{opts.latent_overlap}), VAE in tiles of {opts.vae_tile} px (overlap {opts.vae_overlap}): "
                         + plan.describe())
        else:
            lines.append(f"One pass, not tiled (the image fits a {opts.latent_tile * 8} px UNet tile and a "
                         f"{opts.vae_tile} px VAE tile); host memory ~{_bytes(plan.host)}")
        if self._speed is None:
            lines.append("Time: no estimate yet (the first restore measures this model's speed here).")
        else:
            est = self._speed.seconds * H * W / self._speed.pixels
            note = "" if self._key((1, H, W), opts) in self._compiled else (
                " plus compiling for this size first" + (f" (the first size took {_duration(self._first_compile)})"
                                                          if self._first_compile else ""))
            lines.append(f"Estimated time: ~{_duration(est)}{note}; measured "
                         f"{_duration(self._speed.seconds)} for {_mp(self._speed.pixels)}.")
        return "\n\n".join(lines)

    # -- work ------------------------------------------------------------------------------------------------------

    def _run(self, x_up: np.ndarray, opts: RestoreOptions) -> tuple[np.ndarray, float, CompileSpan]:
        """Restore one upscaled image; ``(sr, seconds, compile span)``; records the speed."""
        with self._lock:
            start = time.perf_counter()
            with CompileSpan() as span:
                sr = self.restorer(x_up[None], opts)[0]
            seconds = time.perf_counter() - start
            self._compiled.add(self._key((1,) + x_up.shape[:2], opts))
            work = max(seconds - span.seconds, 1e-6)
            pixels = x_up.shape[0] * x_up.shape[1]
            # The largest measured image predicts large ones best (small ones are dominated by fixed costs).
            if self._speed is None or pixels >= self._speed.pixels:
                self._speed = Speed(pixels, work)
            if span.seconds > 0.5 and self._first_compile is None:
                self._first_compile = span.seconds
        if not np.isfinite(sr).all():
            raise DemoInputError(f"the {self.restorer.method} model produced non-finite values (NaN/inf) for this "
                                 "image and these knobs")
        return sr, seconds, span

    def restore(self, path: str | Path, upscale: Any, color_fix: str | None = None,
                knobs: Mapping[str, Any] | None = None, name: str | None = None) -> Result:
        """Restore the image file at ``path``: bicubic x``upscale``, the model with ``knobs`` (the others at their
        initial values), ``color_fix``; writes the full-size PNG for download. Raises DemoInputError for bad
        input (checked before any work)."""
        opts = self.options_for(color_fix, knobs)
        name = name or Path(path).name
        h, w, H, W = self.output_size(path, upscale, name)
        x_up = upscale_bicubic(self.read(path, name), self.check_upscale(upscale))
        sr, seconds, span = self._run(x_up, opts)
        out = self._write(sr, name, opts)
        moved = [f"{c.name}={opts.knobs[c.name]:g}" if not isinstance(opts.knobs[c.name], str)
                 else f"{c.name}={opts.knobs[c.name]}" for c in self.controls
                 if c.name in opts.knobs and opts.knobs[c.name] != c.value]
        summary = (f"Restored {w}x{h} → {W}x{H} with {self.restorer.label or self.restorer.method}"
                   + (f" ({', '.join(moved)})" if moved else "") + f" in {_duration(seconds)}")
        summary += (f" (of which {_duration(span.seconds)} compiling {span.programs} program(s) for this size or "
                    "these recompiling knobs: once)" if span.programs
                    else " (no compiling: the programs for this size were ready)")
        return Result(x_up, sr, out, seconds, span.seconds, span.programs, summary + ".")

    def sweep(self, path: str | Path, upscale: Any, knob: str, count: int, color_fix: str | None = None,
              knobs: Mapping[str, Any] | None = None, name: str | None = None
              ) -> tuple[list[tuple[Any, np.ndarray]], str]:
        """Restore the image once per value of ``knob`` over its range (:func:`jsr.demo.controls.sweep_values`),
        the other knobs at ``knobs``. Returns ``([(value, sr)], summary line)``."""
        if knob not in self._by_name:
            raise DemoInputError(f"this {self.restorer.method} model has no knob {knob!r} to sweep "
                                 f"(its knobs: {', '.join(self._by_name) or 'none'})")
        try:
            values = sweep_values(self._by_name[knob], int(count))
        except (TypeError, ValueError) as e:
            raise DemoInputError(str(e)) from None
        base = self.options_for(color_fix, knobs)
        name = name or Path(path).name
        self.output_size(path, upscale, name)
        x_up = upscale_bicubic(self.read(path, name), self.check_upscale(upscale))
        out, total, compiled, programs = [], 0.0, 0.0, 0
        for v in values:
            sr, seconds, span = self._run(x_up, base.with_knobs(**{knob: v}))
            out.append((v, sr))
            total, compiled, programs = total + seconds, compiled + span.seconds, programs + span.programs
        summary = f"Swept {knob} over {', '.join(map(str, values))} in {_duration(total)}"
        summary += (f" (of which {_duration(compiled)} compiling {programs} program(s))." if programs
                    else " (no compiling).")
        return out, summary

    def warm_up(self, size: int = 64, upscale: float = 4.0) -> Result:
        """Restore a procedural ``size`` x ``size`` image twice: the first compiles the programs for that input
        size, the second measures the speed the time estimates start from. Returns the second result."""
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
        img = np.stack([y, x, 0.5 + 0.25 * np.sin(8 * x * y)], -1) + 0.05 * rng.standard_normal((size, size, 3))
        path = self.out_dir / "warm-up.png"
        write_image(path, np.clip(img, 0, 1))
        self.restore(path, upscale)
        return self.restore(path, upscale)

    def _write(self, sr: np.ndarray, name: str, opts: RestoreOptions) -> Path:
        """The full-size PNG ``<out_dir>/<n>/<stem>_sr.png`` (marked like ``jsr.infer``'s outputs, with the
        knobs in its description); folders beyond the last :data:`KEEP_RESULTS` are deleted."""
        self._runs += 1
        folder = self.out_dir / f"{self._runs:06d}"
        path = folder / f"{Path(name).stem or 'image'}_sr.png"
        knobs = {c.name: opts.knobs.get(c.name, c.value) for c in self.controls}
        write_image(path, sr, software=OUTPUT_MARKER,
                    description=json.dumps({"input": name, "method": self.restorer.method, "knobs": knobs,
                                            "color_fix": opts.color_fix}))
        old = sorted(p for p in self.out_dir.iterdir() if p.is_dir())[:-KEEP_RESULTS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path


def preview(img: np.ndarray) -> np.ndarray:
    """An image for the page: [H, W, 3] uint8 (the page's encoder wants 8-bit)."""
    return to_uint8(img)
