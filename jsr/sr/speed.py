"""Time estimates for a restore, before the work starts, from program calls timed on earlier runs.

A restore is a sequence of program calls (the progress steps of :class:`jsr.sr.infer.MemoryPlan`), grouped into
phases (VAE encode, the latent step, VAE decode), each phase a few programs (one per VAE stage, or one tile
program) called on one shape. A call of a program on a shape takes about the same time every time on a machine,
so the restorer times every call (:attr:`jsr.sr.infer.Restorer.last_timing`) and a :class:`SpeedLog` keeps, per
restorer configuration, machine and call shape, the mean seconds per call, leaving out each program's first
call in a process (it compiles, or loads the compiled program from the cache). An estimate is the sum over the
plan's phases of calls x seconds per call; it covers the model's calls, not compiling, reading or writing files.

The log is a small JSON file (``$JSR_CACHE/speed.json``, ``~/.cache/jsr/speed.json`` by default), rewritten
atomically after each restore; the latest measurement of a key replaces the earlier one (the machine's load
changes more than a program does).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from jsr.console import cache_root


def default_path() -> Path:
    """``$JSR_CACHE/speed.json`` (``~/.cache/jsr/speed.json``)."""
    return cache_root() / "speed.json"


def speed_log() -> "SpeedLog | None":
    """The command lines' log: :func:`default_path`, or None when ``JSR_SPEED_LOG=off``."""
    if os.environ.get("JSR_SPEED_LOG", "").lower() in ("off", "0", "no"):
        return None
    return SpeedLog(default_path())


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a restore (``name``: ``encode``, ``latent``, ``decode``) run as ``kind`` (the VAE's
    ``whole``/``staged``/``spilled``/``blended``; ``tiles`` for the latent step): ``calls`` calls of ``programs``
    programs, stage-major (``calls / programs`` calls of the first program, then of the second...), each call on
    an input of ``call_shape``."""

    name: str
    kind: str
    calls: int
    programs: int
    call_shape: tuple[int, ...]

    def key(self) -> str:
        return f"{self.name} {self.kind} {'x'.join(str(v) for v in self.call_shape)}"


def compile_free(durations: Sequence[float], phase: Phase) -> list[float]:
    """The calls of ``durations`` (seconds, in call order) that are not a program's first in ``phase`` (the one
    that compiled, or loaded the compiled program, when the process first met that shape)."""
    per = max(1, phase.calls // max(1, phase.programs))
    return [d for i, d in enumerate(durations) if i % per]


def machine() -> str:
    """The device the estimate is for: JAX's backend and device kind, and the host's core count on CPU."""
    import jax

    dev = jax.devices()[0]
    where = f"{jax.default_backend()}:{dev.device_kind}"
    if jax.default_backend() == "cpu":
        where += f" ({os.cpu_count()} cores, {platform.machine()})"
    return where


class SpeedLog:
    """Measured seconds per call, by restorer configuration (``model``: what :class:`jsr.sr.infer.Restorer`'s
    ``profile`` names: base, dtype, method, devices), machine and phase/call shape.

    ``path=None``: kept in memory only (tests; ``JSR_SPEED_LOG=off`` for the command lines).
    """

    def __init__(self, path: str | os.PathLike | None = None, machine_name: str | None = None):
        self.path = Path(path) if path is not None else None
        self.machine = machine_name or machine()
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = dict(data.get("entries", {})) if isinstance(data, dict) else {}
            except (OSError, ValueError):  # a damaged log is a missing one: it only holds estimates
                self.entries = {}

    def _key(self, model: str, phase: Phase) -> str:
        return f"{model} | {self.machine} | {phase.key()}"

    def estimate(self, model: str, phases: Sequence[Phase]) -> float | None:
        """Seconds the calls of ``phases`` take (compiling not included), or None when a phase with calls has
        no measurement for this model, machine and call shape."""
        total = 0.0
        for phase in phases:
            if not phase.calls:
                continue
            entry = self.entries.get(self._key(model, phase))
            if entry is None:
                return None
            total += phase.calls * float(entry["seconds_per_call"])
        return total

    def record(self, model: str, phases: Sequence[Phase], timing: Mapping[str, Sequence[float]],
               compiled: bool = True) -> int:
        """Keep the mean compile-free seconds per call of every phase in ``timing`` (durations by phase name, as
        :attr:`jsr.sr.infer.Restorer.last_timing`), and write the log. ``compiled=False``: the restore compiled
        nothing (its shape was seen before in this process), so every call counts. Returns how many phases were
        recorded (a phase whose calls all compiled has nothing to measure)."""
        n = 0
        for phase in phases:
            durations = list(timing.get(phase.name, ()))
            if len(durations) != phase.calls:
                continue  # the restore did not run as planned (an error part-way): nothing reliable
            free = compile_free(durations, phase) if compiled else durations
            if not free:
                continue
            self.entries[self._key(model, phase)] = {
                "seconds_per_call": sum(free) / len(free), "calls_measured": len(free),
                "date": datetime.date.today().isoformat()}
            n += 1
        if n:
            self.save()
        return n

    def save(self) -> None:
        """Write the log (atomically: a temporary file renamed over it); silent when it cannot be written (the
        log only holds estimates)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".speed.", suffix=".json",
                                             delete=False) as f:
                json.dump({"entries": self.entries}, f, indent=1, sort_keys=True)
            os.replace(f.name, self.path)
        except OSError:
            pass


def describe_duration(seconds: float) -> str:
    """``"~40 s"``, ``"~3 min 20 s"``, ``"~1 h 5 min"``."""
    s = max(1, int(round(seconds)))
    if s < 60:
        return f"~{s} s"
    if s < 3600:
        return f"~{s // 60} min {s % 60:02d} s" if s < 600 else f"~{round(s / 60)} min"
    return f"~{s // 3600} h {round((s % 3600) / 60)} min"
