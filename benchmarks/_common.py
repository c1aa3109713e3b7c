"""What every JAX benchmark script records about where it ran, and how it writes its JSON."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import jax


def environment() -> dict[str, Any]:
    """Date, host and JAX backend/device of this run (the keys every result JSON starts with)."""
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
            "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_result(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parents created) and say so on stdout."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


@contextlib.contextmanager
def device_lock():
    """Hold the device for timing while another benchmark process compiles beside this one.

    ``$JSR_BENCH_LOCK`` names a lock file shared by benchmark processes run side by side on one accelerator (the
    device session script): compiling (host CPU) overlaps, timed runs never do. Unset: no lock.
    """
    path = os.environ.get("JSR_BENCH_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compile_in_order(lowered: dict[str, Any], workers: int | None = None) -> Iterator[tuple[str, Any, float]]:
    """Compile jax ``Lowered`` programs in parallel threads (XLA compiles without the GIL) and yield
    ``(name, Compiled or the exception, compile seconds)`` in ``lowered``'s order, each as soon as it and those
    before it are ready: the caller times one program while the later ones still compile."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name, low):
        t0 = time.perf_counter()
        try:
            out = low.compile()
        except Exception as e:  # noqa: BLE001 - reported per program, the others still run
            out = e
        secs = time.perf_counter() - t0
        print(f"compiled {name} in {secs:.0f} s" + (f" (FAILED: {type(out).__name__})"
                                                      if isinstance(out, Exception) else ""), flush=True)
        return out, secs

    with ThreadPoolExecutor(max_workers=workers or max(1, len(lowered))) as pool:
        futures = [(name, pool.submit(one, name, low)) for name, low in lowered.items()]
        for name, fut in futures:
            yield (name, *fut.result())


def program_bytes(compiled) -> dict[str, int] | None:
    """XLA's memory plan of one compiled program: argument, output, temporary and generated-code bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend plans memory
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


# Train-step programs the benchmarks build: key -> (config module, config variant, phase index, negative from the
# last). PiSA-SR's two phases are separate programs; CODSR stage 1 is taken in its GAN phase (from step 3,000 of
# 14,000: what most of its steps run).
TRAIN_PROGRAMS = {
    "osediff": ("osediff", None, 0),
    "fidelity": ("fidelity", None, 0),
    "pisa-pix": ("pisasr", None, 0),
    "pisa-sem": ("pisasr", None, 1),
    "ctsr1": ("ctsr", "stage1", 0),
    "ctsr2": ("ctsr", "stage2", 0),
    "fidesr": ("fidesr", None, 0),
    "rcod": ("rcod", None, 0),
    "codsr1": ("codsr", "stage1", -1),
    "codsr2": ("codsr", "stage2", 0),
}
