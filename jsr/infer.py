"""``python -m jsr.infer``: restore image files, folders or globs with a one-step SR model.

    python -m jsr.infer photo.jpg --model sd21-base/ --lora ctsr2/export --t 0.3
    python -m jsr.infer lq/ --model sd21-base/ --lora export/student --lora control=ctsr2/export/control --t 0.3

The method and its knobs come from the registry (:mod:`jsr.methods`): every knob of every registered method is a
flag ``--<knob>`` (``--t``, ``--lambda_pix``...; one spelling, underscores, in every jsr command line), and a
knob the model does not honour is refused.

Files: a folder contributes its image files (by extension, not recursive); a glob its matches; a file is taken
as given. Each LQ is upscaled (bicubic, ``--upscale 4``) and restored by :class:`jsr.sr.infer.Restorer` (any
size, tiled when large, colour-fixed). Same-size inputs are batched, one image per device by default; with
``--devices`` (default: every GPU/TPU, one CPU) each batch, or each call's tiles, is split over the devices
(:mod:`jsr.sr.data_parallel`). Outputs go next to each input
(``<stem><suffix>.<ext>``, suffix ``_sr``) or into ``--output``; an output name that would land on an input is
changed (:func:`plan_outputs`), so inputs are never overwritten. Outputs carry ``jsr.infer`` in their EXIF
``Software`` tag (PNG, JPEG, WebP, TIFF); a folder or glob leaves out files with the suffix and that tag, so
rerunning on a folder does not restore the previous run's results (``x_sr_sr.png``), and ``--skip-existing``
makes the rerun restore nothing. A file that cannot be read (missing, empty, not an image PIL can decode) is
named once and skipped; the others complete, and the exit status is 1. The inputs are checked before the model
loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

import jsr.methods
from jsr.cli import guard, report_user_error, start_jax
from jsr.methods.restorer import check_options, knob_overrides, load_restorer
from jsr.sr import colorfix
from jsr.sr.data_parallel import describe as describe_devices
from jsr.sr.data_parallel import select_devices
from jsr.sr.infer import Restorer, RestoreOptions, upscale_bicubic
from jsr.sr.speed import speed_log

# Files are read and written by jsr.data.images (one reader for inference, training data and metrics); its names
# stay importable from here.
from jsr.data.images import BadImageError, image_size, list_images, read_image, write_image  # noqa: F401
from jsr.data.images import IMAGE_EXTENSIONS as IMAGE_EXTS
from jsr.data.images import written_by

# The EXIF Software tag of every image this tool writes: with the suffix, what marks a file as one of its outputs.
OUTPUT_MARKER = "jsr.infer"


@dataclasses.dataclass(frozen=True)
class Failure:
    """One input that was skipped: its path (or the pattern that matched nothing) and why."""

    path: str
    reason: str


@dataclasses.dataclass
class RunReport:
    """What :func:`restore` did: ``done`` maps input -> output path; ``failed`` lists skipped inputs."""

    done: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: list[Failure] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------------------------------------------
# Files in and out


def is_own_output(path: str | os.PathLike, suffix: str = "_sr") -> bool:
    """Whether ``path`` is an output of this tool: its stem ends with ``suffix`` (a ``_<n>`` disambiguation
    counter allowed) and its metadata carries :data:`OUTPUT_MARKER` (written by :func:`restore`). Both are
    needed, so a user's own ``photo_sr.png`` is still an input."""
    p = Path(path)
    stem = re.sub(r"_\d+$", "", p.stem) if suffix else p.stem
    if suffix and not (p.stem.endswith(suffix) or stem.endswith(suffix)):
        return False
    return written_by(p) == OUTPUT_MARKER


def collect_inputs(specs: Iterable[str | os.PathLike], suffix: str | None = None,
                   own_outputs: list[Path] | None = None) -> tuple[list[Path], list[Failure]]:
    """Expand files, folders (their image files, sorted, not recursive) and globs (``**`` allowed) into a list
    of files without duplicates, in order. A spec that names nothing is a :class:`Failure`.

    With ``suffix`` (the run's output suffix), files a folder or glob finds that are outputs of this tool
    (:func:`is_own_output`) are left out, and appended to ``own_outputs`` when given: a rerun on a folder does not
    restore the previous run's results. A file named explicitly is always an input.
    """
    files: list[Path] = []
    failed: list[Failure] = []

    def found_in(spec_files: list[Path]) -> list[Path]:
        if suffix is None:
            return spec_files
        keep = []
        for f in spec_files:
            if is_own_output(f, suffix):
                if own_outputs is not None:
                    own_outputs.append(f)
            else:
                keep.append(f)
        return keep

    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            found = list_images(p, recursive=False)
            if not found:
                failed.append(Failure(spec, f"folder has no image files ({', '.join(IMAGE_EXTS)})"))
            files += found_in(found)
        elif p.exists():
            files.append(p)
        elif glob.has_magic(spec):
            found = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not found:
                failed.append(Failure(spec, "no file matches this pattern"))
            files += found_in(found)
        else:
            failed.append(Failure(spec, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, failed


def plan_outputs(files: Sequence[Path], output: str | os.PathLike | None = None, suffix: str = "_sr",
                 ext: str = "png") -> dict[Path, Path]:
    """The output path of every input: ``<output or input folder>/<stem><suffix>.<ext>``.

    Inputs are never overwritten, whatever ``output`` and ``suffix`` are: a name that is already planned or that
    is (or links to) an input file becomes ``<stem>_<input ext><suffix>.<ext>`` (``a.jpg`` and ``a.png`` ->
    ``a_jpg_sr.png``, ``a_png_sr.png``; with an empty suffix into the input folder, ``a.png`` -> ``a_png.png``),
    then ``<stem>_<input ext><suffix>_<n>.<ext>``.
    """
    ext = ext.lstrip(".").lower()
    inputs = {f.resolve() for f in files}
    taken: set[Path] = set()
    plan: dict[Path, Path] = {}

    def free(p: Path) -> bool:
        r = p.resolve()
        return r not in taken and r not in inputs and not (p.exists() and any(_same(p, i) for i in inputs))

    for f in files:
        folder = Path(output) if output is not None else f.parent
        tag = f"{f.stem}_{f.suffix.lstrip('.').lower() or 'noext'}"
        out = folder / f"{f.stem}{suffix}.{ext}"
        if not free(out):
            out = folder / f"{tag}{suffix}.{ext}"
        n = 2
        while not free(out):
            out = folder / f"{tag}{suffix}_{n}.{ext}"
            n += 1
        taken.add(out.resolve())
        plan[f] = out
    return plan


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def restore(inputs: Sequence[str | os.PathLike], restorer: Restorer, opts: RestoreOptions = RestoreOptions(), *,
            output: str | os.PathLike | None = None, suffix: str = "_sr", ext: str = "png", upscale: float = 4.0,
            batch_size: int = 1, skip_existing: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None) -> RunReport:
    """Restore every image named by ``inputs`` (files, folders, globs) and write the results.

    Same-size inputs run together in batches of ``batch_size``. Controls the restorer ignores are refused up
    front (:func:`jsr.sr.infer.check_options`). Each bad input (and each batch whose model call raised) becomes a
    :class:`Failure` in the report, logged through ``log`` (stderr by default); the rest complete. ``upscale``:
    the bicubic pre-upscale of every LQ (output size / input size). Returns the :class:`RunReport`.
    """
    check_options(restorer, opts)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    report = RunReport()
    own: list[Path] = []
    files, failed = collect_inputs(inputs, suffix, own)
    if own:
        names = ", ".join(f.name for f in own[:5]) + (f" and {len(own) - 5} more" if len(own) > 5 else "")
        log(f"left out {len(own)} output(s) of an earlier run ({names}); name a file to restore it")
    plan = plan_outputs(files, output, suffix, ext)

    def fail(path: Any, reason: str) -> None:
        report.failed.append(Failure(str(path), reason))
        log(f"skipped {path}: {reason}")

    for f in failed:
        fail(f.path, f.reason)
    groups: dict[tuple[int, int], list[Path]] = {}
    for f in plan:
        if skip_existing and plan[f].exists():
            log(f"exists, skipped: {plan[f]}")
            continue
        if skip_existing and is_own_output(f, suffix):  # named explicitly, and a result already
            log(f"an output of {OUTPUT_MARKER}, skipped: {f}")
            continue
        try:
            groups.setdefault(image_size(f), []).append(f)
        except BadImageError as e:
            fail(f, str(e))
    total = sum(len(v) for v in groups.values())
    with tqdm(total=total, unit="img", disable=not progress, file=sys.stderr) as bar:
        for files_of_size in groups.values():
            for i in range(0, len(files_of_size), max(1, batch_size)):
                chunk = files_of_size[i:i + max(1, batch_size)]
                imgs, names = [], []
                for f in chunk:
                    try:
                        imgs.append(upscale_bicubic(read_image(f), upscale))
                        names.append(f)
                    except BadImageError as e:
                        fail(f, str(e))
                        bar.update(1)
                if not imgs:
                    continue
                try:
                    batch = np.stack(imgs)
                    del imgs
                    steps = restorer.plan_input(batch.shape, opts).steps
                    # Large images take minutes: a second bar moves per tile and VAE stage, not per image.
                    with tqdm(total=steps, unit="step", desc=names[0].name, leave=False, file=sys.stderr,
                              disable=not progress or steps < 20) as tiles:
                        sr = restorer(batch, opts, tiles.update)
                    del batch
                except Exception as e:  # noqa: BLE001 - one failing batch (e.g. out of memory) must not end the run
                    for f in names:
                        fail(f, f"restoration failed ({type(e).__name__}: {e})")
                    bar.update(len(names))
                    continue
                for f, img in zip(names, sr):
                    try:
                        write_image(plan[f], img, software=OUTPUT_MARKER,
                                    description=json.dumps({"input": f.name, "method": restorer.method}))
                        report.done[str(f)] = str(plan[f])
                    except OSError as e:
                        fail(f, f"cannot write {plan[f]} ({e})")
                    bar.update(1)
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GB"``, ``"2GiB"`` or a plain byte count -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M, 1.5GB)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def add_knob_flags(p: argparse.ArgumentParser) -> None:
    """One ``--<knob>`` flag per knob of every registered method (default ``None``: the model's own value)."""
    by_method: dict[str, list] = {}
    for knob in jsr.methods.all_knobs().values():
        owners = [n for n in jsr.methods.names() if knob.name in jsr.methods.get(n).knob_names()]
        by_method.setdefault(", ".join(owners), []).append(knob)
    for owners, knobs in by_method.items():
        g = p.add_argument_group(f"knobs ({owners})")
        for k in knobs:
            names = [f"--{k.name}"] + ([f"--{k.name.replace('_', '-')}"] if "_" in k.name else [])
            g.add_argument(*names, dest=f"knob_{k.name}", default=None, metavar=k.type.__name__.upper(),
                           help=k.describe())


def knob_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The knob flags that were given, parsed and range-checked (:func:`add_knob_flags`)."""
    return knob_overrides({k[len("knob_"):]: v for k, v in vars(args).items() if k.startswith("knob_")})


def add_model_flags(p: argparse.ArgumentParser, g: Any, model_default: str | None = None) -> None:
    """The model flags (``--model``, ``--lora``, ``--method``, ``--prompt``, ``--dtype``, ``--attention``) into
    group ``g`` and every registered knob's flag into ``p``: what ``python -m jsr.infer`` and ``python -m jsr.demo``
    share. ``model_default``: ``--model``'s default (``None``: required)."""
    model_help = ("base SD folder (diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/), or 'tiny' for "
                  "the embedded tiny random model (a smoke test, no real restoration)")
    if model_default is None:
        g.add_argument("--model", required=True, help=model_help)
    else:
        g.add_argument("--model", default=model_default, help=f"{model_help} (default: {model_default})")
    g.add_argument("--lora", action="append", default=[], metavar="[ROLE=]PATH",
                   help="model files (repeatable): a jsr export (<workdir>/export or one group of it: its manifest "
                        "names the method), a release file (OSEDiff/PiSA-SR .pkl...), or a peft/diffusers LoRA. "
                        "ROLE=PATH gives a tree its role, e.g. control=ctsr2/export/control, sem=pisa_sem/")
    g.add_argument("--method", choices=("auto",) + jsr.methods.names(), default="auto",
                   help="auto: from the files' manifests or formats, else the method whose roles fit the files")
    g.add_argument("--prompt", default="", help="text prompt for the UNet's cross-attention (default: empty)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter/compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    g.add_argument("--attention", default="auto", help="attention implementation (jsr.models.attention)")
    add_knob_flags(p)


def add_devices_flag(g: Any) -> None:
    """``--devices`` into group ``g`` (jsr.infer; evaluate.py has the same flag through absl)."""
    g.add_argument("--devices", default="auto", metavar="auto|all|N",
                   help="local devices to restore on, data parallel (each call's images or tiles split over them, the "
                        "parameters replicated): auto = all of them on GPU/TPU, 1 on CPU (default); all; or a count")


def add_tiling_flags(g: Any) -> None:
    """The tiling and memory flags (``--latent_tile`` ... ``--spill_dir``) into group ``g`` (jsr.infer, jsr.demo)."""
    g.add_argument("--latent_tile", "--latent-tile", type=int, default=96,
                   help="UNet tile size in latent pixels (x8 in the image)")
    g.add_argument("--latent_overlap", "--latent-overlap", type=int, default=32,
                   help="UNet tile overlap in latent pixels")
    g.add_argument("--vae_tile", "--vae-tile", type=int, default=1024,
                   help="VAE tile size in output pixels (0: never tile)")
    g.add_argument("--vae_overlap", "--vae-overlap", type=int, default=RestoreOptions.vae_overlap,
                   help="VAE tile overlap in output pixels (half of it is each tile's context)")
    g.add_argument("--tiles_per_call", "--tiles-per-call", type=int, default=1, help="tiles batched per UNet/VAE call")
    g.add_argument("--max_memory", "--max-memory", type=parse_bytes, default=0, metavar="SIZE",
                   help="host memory to plan each image size against, e.g. 8G: the VAE's staged tiles keep their "
                        "carries in memory while they fit, else spill them to --spill_dir, else (no disk room) run as "
                        "blended tiles; the plan and its estimate are printed before the work (default: no budget)")
    g.add_argument("--spill_dir", "--spill-dir", default="",
                   help="where --max_memory spills tile carries (default: the system's temporary folder)")
    g.add_argument("--max_device_memory", "--max-device-memory", type=parse_bytes, default=0, metavar="SIZE",
                   help="device memory one UNet/VAE call may use beside the weights, e.g. 6G: fewer tiles per call, "
                        "then smaller VAE tiles, then smaller UNet tiles until the planned calls fit (counting XLA's "
                        "working memory, compiled ahead); default: the GPU/TPU's free memory, no limit on CPU")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m jsr.infer`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m jsr.infer",
        description="Restore images with a one-step diffusion SR model (any registered method: "
                    f"{', '.join(jsr.methods.names())}). Inputs: files, folders or globs; any size.")
    p.add_argument("inputs", nargs="+", help="image files, folders (their images) or glob patterns")
    add_model_flags(p, p.add_argument_group("model"))
    g = p.add_argument_group("processing")
    g.add_argument("--upscale", type=float, default=4.0, help="output size / input size (bicubic pre-upscale)")
    g.add_argument("--color_fix", "--color-fix", choices=colorfix.METHODS, default="adain")
    add_tiling_flags(g)
    g.add_argument("--batch_size", "--batch-size", type=int, default=None,
                   help="same-size images restored together (default: one per device)")
    add_devices_flag(g)
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", help="output folder (default: next to each input)")
    g.add_argument("--suffix", default="_sr", help="appended to each output's file stem (default _sr)")
    g.add_argument("--ext", default="png", choices=("png", "jpg", "webp", "bmp", "tif"), help="output format")
    g.add_argument("--skip_existing", "--skip-existing", action="store_true",
                   help="leave inputs whose output exists alone, and files named explicitly that are outputs of "
                        "this tool (folders and globs always leave those out)")
    g.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
    return p


@guard
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jsr.infer``. Returns the exit status: 0 when every input was restored (or there was nothing
    to do), 1 when some were skipped (each is named once on stderr), 2 when no input is usable, the model could
    not be loaded or the arguments are invalid (one ``error:`` line, before any model is loaded where it can)."""
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        opts = RestoreOptions(knobs=knob_flags(args), color_fix=args.color_fix, latent_tile=args.latent_tile,
                              latent_overlap=args.latent_overlap, vae_tile=args.vae_tile,
                              vae_overlap=args.vae_overlap, tiles_per_call=args.tiles_per_call,
                              max_memory=args.max_memory, spill_dir=args.spill_dir,
                              max_device_memory=args.max_device_memory)
        if args.upscale <= 0:
            raise ValueError(f"--upscale must be positive, got {args.upscale}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    except ValueError as e:
        return report_user_error(e)
    start_jax()
    # The inputs first: a mistyped path should not cost a model load.
    own: list[Path] = []
    files, failed = collect_inputs(args.inputs, args.suffix, own)
    for f in failed:
        log(f"skipped {f.path}: {f.reason}")
    if own:
        names = ", ".join(f.name for f in own[:5]) + (f" and {len(own) - 5} more" if len(own) > 5 else "")
        log(f"left out {len(own)} output(s) of an earlier run ({names}); name a file to restore it")
    if not files:
        if failed:
            return report_user_error(ValueError("no input image to restore (see above)"))
        log("nothing to restore")
        return 0
    try:
        devices = select_devices(args.devices)
        log(describe_devices(devices))
        restorer = load_restorer(args.model, args.lora, method=args.method, dtype=args.dtype, prompt=args.prompt,
                                 attention_impl=args.attention, devices=devices)
        check_options(restorer, opts)
        restorer.speed = speed_log()  # time estimates in the plan line, from earlier runs' timings
        restorer.plan_temporaries = True  # large images' plans count XLA's working memory
    except (ValueError, FileNotFoundError, OSError) as e:
        return report_user_error(e)
    batch_size = len(devices) if args.batch_size is None else args.batch_size
    report = restore(files, restorer, opts, output=args.output, suffix=args.suffix, ext=args.ext,
                     upscale=args.upscale, batch_size=batch_size, skip_existing=args.skip_existing,
                     progress=not args.no_progress, log=log)
    n = len(report.done)
    per = f", {report.seconds / n:.2f} s/image" if n else ""
    log(f"restored {n} image(s) with {restorer.method} in {report.seconds:.1f} s{per}")
    n_failed = len(failed) + len(report.failed)
    if n_failed:
        log(f"{n_failed} input(s) failed (each named above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
