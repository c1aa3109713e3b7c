"""One line on stderr before a long phase that would otherwise be silent (writing the embedded tiny model,
compiling a program), so that a minute without output on a first run is explained.

Imports nothing from jsr, so every layer may use it. ``JSR_QUIET=1`` silences it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """Where jsr keeps what it makes once (the tiny model, compiled programs, the speed log): ``$JSR_CACHE``,
    else ``~/.cache/jsr``."""
    return Path(os.environ.get("JSR_CACHE", Path.home() / ".cache" / "jsr")).expanduser()


def notice(message: str) -> None:
    """Print ``jsr: <message>`` on stderr (flushed at once: the phase that follows may take minutes)."""
    if os.environ.get("JSR_QUIET", "") not in ("", "0"):
        return
    try:  # through tqdm, so that a progress bar on stderr is redrawn below the line instead of cut by it
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; the plain print is the fallback
        print(f"jsr: {message}", file=sys.stderr, flush=True)
        return
    tqdm.write(f"jsr: {message}", file=sys.stderr)
    sys.stderr.flush()


def cache_note() -> str:
    """Where compiled programs persist, for a notice: ``slow on the first run only; cached in DIR`` or that the
    persistent compilation cache is off."""
    import jax

    where = jax.config.jax_compilation_cache_dir
    if not where:
        return "the persistent compilation cache is off, so every run compiles again"
    home = os.path.expanduser("~")
    shown = "~" + where[len(home):] if home != "/" and where.startswith(home + os.sep) else where
    return f"slow on the first run only; cached in {shown}"


def compiling(what: str) -> None:
    """The notice before the first call of a jitted program: ``jsr: compiling <what> (<cache note>)...``."""
    notice(f"compiling {what} ({cache_note()})...")
