"""Shared start-up of jsr's command lines (``train.py``, ``evaluate.py``, ``python -m jsr.infer``,
``python -m jsr.weights``): help exits 0, an input the user gave that is wrong (a damaged weight file, a data
folder with no usable image...) ends the run with one ``error: ...`` line and exit status 2, not a traceback,
and JAX's persistent compilation cache is on (:func:`enable_compilation_cache`), so only the first run of a
command compiles; XLA:CPU compiles with its fast-compile preset and YNNPACK fusions off
(:func:`cpu_compile_defaults`; ``JSR_XLA_CPU_PRESET=default`` opts out).

The cache: ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$JSR_CACHE/xla`` (``~/.cache/jsr/xla``);
``JSR_XLA_CACHE=DIR`` moves it, ``JSR_XLA_CACHE=off`` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from jsr.console import cache_root

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
USER_ERROR_STATUS = 2


def compilation_cache_dir() -> Path | None:
    """Where the command lines keep compiled XLA programs (see the module docstring); ``None``: off."""
    choice = os.environ.get("JSR_XLA_CACHE", "")
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    if choice:
        return Path(choice).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    return cache_root() / "xla"


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache at :func:`compilation_cache_dir` (off: make sure it is off);
    returns the folder. Every program is stored, the small ones too (``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
    sets JAX's threshold instead, 1 s by default)."""
    import jax

    where = compilation_cache_dir()
    if where is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # a user's own threshold wins
        # Every program, not only those over JAX's default 1 s: the README's first command compiles ~100 small
        # ones (optimizer init, random draws, host-side ops), 4.8 s of a warm start when compiled again.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return where


# XLA:CPU's fast-compile preset, and its YNNPACK library fusions off. Measured on the 2-core machine
# (2026-11-30), the README's first command (CTSR stage 1, tiny): the preset took the train step's cold compile
# from 510 to 309 s of CPU, the step itself from 1.15 to 1.85 steps/s and peak memory from 5.6 to 3.5 GB. Reading
# the compiled step back from the persistent cache stayed slow with it (78 s): XLA's YnnFusionThunkFromProto
# searches the module linearly for every fused instruction, so the load is quadratic in the program's size
# (a third of the warm run's CPU samples). With the YNN fusions off that read takes 32 s and the step runs
# as fast (2.0 steps/s; a 3x3 128-channel convolution at 256 px: 0.21 s either way; a 2048^2 matmul 0.16 ->
# 0.19 s, the price).
CPU_FAST_COMPILE = ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE "
                    "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution,-reduce")


def cpu_compile_defaults() -> str | None:
    """Add :data:`CPU_FAST_COMPILE` (XLA:CPU's fast-compile preset, YNNPACK fusions off; GPU and TPU ignore both)
    to ``$XLA_FLAGS`` unless the flags already choose a preset or YNN fusion types, or
    ``JSR_XLA_CPU_PRESET=default`` opts out; returns the flags added, or None. It only takes effect when called
    before JAX starts its CPU backend (the command lines call it first)."""
    if os.environ.get("JSR_XLA_CPU_PRESET", "").lower() == "default":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_opt_preset" in flags or "--xla_cpu_experimental_ynn_fusion_type" in flags:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_FAST_COMPILE}".strip()
    return CPU_FAST_COMPILE


def start_jax() -> Path | None:
    """What every command line does before JAX computes anything: :func:`cpu_compile_defaults` then
    :func:`enable_compilation_cache` (returned)."""
    cpu_compile_defaults()
    return enable_compilation_cache()


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "an input the user gave is wrong" (each message names the file or folder): they
    are reported as one line with exit status 2. Imported here, when an error is being classified, so that
    starting a command line does not pay for modules it may not use."""
    from jsr.data.images import BadImageError
    from jsr.data.pipeline import DataStarvationError
    from jsr.models.lora import LoRAMismatchError
    from jsr.models.remat import RematConfigError
    from jsr.weights.convert import CheckpointMismatchError
    from jsr.weights.io import CorruptFileError
    from jsr.weights.peft import PeftFormatError

    return (CorruptFileError, CheckpointMismatchError, PeftFormatError, LoRAMismatchError, BadImageError,
            DataStarvationError, FileNotFoundError, RematConfigError)


def one_line(error: BaseException) -> str:
    """``error``'s message with its whitespace (newlines included) collapsed: one line for a terminal or a log."""
    return " ".join(str(error).split()) or type(error).__name__


def report_user_error(error: BaseException) -> int:
    """Print ``error: <message>`` on stderr; returns the exit status for it (2)."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return USER_ERROR_STATUS


def guard(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """``main`` that returns status 2 after one ``error:`` line for :func:`user_errors` (other exceptions, which
    are jsr's bugs, keep their traceback)."""

    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised untouched
            if isinstance(e, user_errors()):
                return report_user_error(e)
            raise

    guarded.__doc__, guarded.__name__ = main.__doc__, getattr(main, "__name__", "main")
    return guarded


def run(main: Callable) -> None:
    """``absl.app.run(main)``, except that asking for help exits 0 (absl's own exit status for it is 1, which
    scripts and users read as a failure) and a user-input error exits 2 with one line (:func:`guard`)."""
    from absl import app

    start_jax()
    try:
        app.run(guard(main))
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
