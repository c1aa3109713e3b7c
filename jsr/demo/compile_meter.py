"""How long JAX spends tracing, lowering and compiling (or reading the persistent cache) in a span of work.

The demo reports it beside each restore time, so a person sees that moving a slider reuses the compiled program
and that a new image size (or a knob that recompiles) costs a compile once. It listens to JAX's own monitoring
events; the events are process-wide, so a span should not overlap other JAX work (the demo runs one restore at a
time).
"""

from __future__ import annotations

import threading

import jax

# The phases of a jit cache miss (jax._src.dispatch's event names): tracing to a jaxpr, lowering it, and the
# backend compile (which includes a persistent-cache read when the program is cached on disk).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")

_lock = threading.Lock()
_total = 0.0
_count = 0
_installed = False


def _listen(event: str, duration: float, **kwargs) -> None:
    global _total, _count
    if event in COMPILE_EVENTS:
        with _lock:
            _total += duration
            _count += event == COMPILE_EVENTS[-1]


def install() -> None:
    """Start counting (once per process)."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _installed = True


def reading() -> tuple[float, int]:
    """``(seconds, programs)``: compile time and backend compiles since :func:`install`."""
    with _lock:
        return _total, _count


class CompileSpan:
    """``with CompileSpan() as span: ...`` then ``span.seconds`` / ``span.programs``: what compiling took inside."""

    seconds: float = 0.0
    programs: int = 0

    def __enter__(self) -> "CompileSpan":
        install()
        self._start = reading()
        return self

    def __exit__(self, *exc) -> None:
        seconds, programs = reading()
        self.seconds = seconds - self._start[0]
        self.programs = programs - self._start[1]
