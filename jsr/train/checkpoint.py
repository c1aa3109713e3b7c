"""Training checkpoints: Orbax ``CheckpointManager`` over the train state and the data iterator's state.

A checkpoint step directory holds two items:

``state``  the train state pytree (LoRA trees, optimizer states, step, RNG key data), restored onto the
           shardings of an abstract target, so a pod restores straight into sharded device memory;
``data``   the input pipeline's iterator state (JSON), so a resumed run continues the exact example stream.

Saves are asynchronous (training continues while the write happens) and keep the newest ``keep`` steps.
Orbax writes into a temporary directory and renames it only once complete, so a checkpoint cut off half-way
(killed process, preempted VM) is never listed nor restored.

Preemption: :class:`PreemptionWatch` turns SIGTERM (what a TPU VM gets before maintenance/preemption) into a
flag the loop checks at each step boundary; multi-host jobs also ask Orbax's ``reached_preemption``, which
agrees on one step across hosts. A wait for data that outlasts a short grace after the signal is cut short
(:meth:`PreemptionWatch.waiting`), so a run whose input has stalled still stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Save/restore train state + data iterator state under ``directory``.

    Args:
      directory: checkpoint root (local path or a ``gs://`` bucket path Orbax understands).
      keep: how many newest checkpoints to keep.
      every: save interval in steps (``save`` with ``force=True`` ignores it).
      async_save: write in a background thread.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every: int = 1000, async_save: bool = True):
        directory = str(directory)
        if "://" not in directory:
            directory = str(Path(directory).absolute())
        self.directory = directory
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               save_interval_steps=1)
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True at the configured interval."""
        return step > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Start saving ``state`` (and the data iterator state) as checkpoint ``step``; returns whether it did.

        A step that already has a checkpoint is not written again.
        """
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state or {})}
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` (default: the newest complete one).

        ``abstract_state`` is the state's structure with ``jax.ShapeDtypeStruct`` leaves carrying the target
        shardings (``jax.eval_shape`` of the init function, with shardings attached).
        Returns ``(state, data_state)``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return out["state"], dict(out["data"] or {})

    def reached_preemption(self, step: int) -> bool:
        """Multi-host agreement that the job is being preempted (False on a single process)."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()


class Preempted(Exception):
    """A watched signal cut short a blocking wait (:meth:`PreemptionWatch.waiting`)."""


class PreemptionWatch:
    """Turns SIGTERM (and optionally SIGINT) into a flag checked at step boundaries, and cuts short a blocking wait
    that would keep the run from reaching the next boundary.

    Use as a context manager; the previous handlers come back on exit. Only the main thread can install signal
    handlers; elsewhere the watch is inert (``requested`` stays False unless :meth:`request` is called).

    Args:
      signals: the signals watched.
      grace: seconds a wait inside :meth:`waiting` may still take after a signal before :class:`Preempted` is
        raised into it (a batch about to arrive still trains and is checkpointed, as at any step boundary; data
        that never comes, e.g. a starving input pipeline, no longer keeps the run alive).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), grace: float = 5.0):
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.grace = float(grace)
        self._waiting = False

    @property
    def requested(self) -> bool:
        """True once a watched signal has arrived."""
        return self._event.is_set()

    def request(self, signum: int | None = None, frame: Any = None) -> None:  # noqa: ARG002 - signal API
        """Mark that the run should save and stop at the next step boundary (or, inside :meth:`waiting`, once
        the grace period is over)."""
        if not self._event.is_set():
            logging.warning("preemption: signal %s received; will checkpoint and stop at the next step", signum)
        self._event.set()
        if self._waiting:
            self._arm()

    def _arm(self) -> None:
        if self.grace <= 0:
            raise Preempted("stop requested while waiting")
        signal.setitimer(signal.ITIMER_REAL, self.grace)

    def _alarm(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        if self._waiting and self.requested:
            raise Preempted(f"stop requested and the wait went on for {self.grace:g} s more")

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A blocking wait (for the next batch) that a watched signal ends: if one arrives before or during it
        and the wait lasts ``grace`` seconds more, :class:`Preempted` is raised inside it. A no-op where the
        watch could not install its handlers."""
        if not self._previous:
            yield
            return
        self._waiting = True
        try:
            if self.requested:
                self._arm()
            yield
        finally:
            self._waiting = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self.request)
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._alarm)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
