"""Which examples of every global batch a process loads, and data-iterator states across process counts.

A multi-process job (the hosts of a TPU pod slice, or several processes on one machine) assembles each global
batch of ``B`` examples from the processes' local batches: ``jax.make_array_from_process_local_data`` puts process
``p``'s ``b = B / P`` local rows at the global rows its devices hold, in increasing order (its *rows*). The example
stream is one global sequence (shuffling, repetition, crops and degradations are functions of the global example
index), and for its ``k``-th local batch process ``p`` loads the global examples ``k * B + rows[j]``. So the
processes together read exactly the single-process stream, each example at the same position of the same batch,
whatever the process count: per-example randomness drawn by batch position (noise, timesteps) is the same too, and a
2-host run trains on what a 1-host run trains on. (A skipped image is replaced from the same process's share, so
with skips the processes' streams are each exact but their union is no longer the single-process one.)

Iterator states: a process's Grain state counts the elements of its share it has consumed. Resuming on the same
layout restores each process's own state exactly. On another layout (more or fewer hosts) :func:`reshard_states`
turns the saved states into the number of global batches consumed and builds each new process's state from it:
exact when no image was skipped.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
from absl import logging

STATE_FORMAT = "jsr.process_share/1"


def contiguous_rows(process_index: int, process_count: int, batch_size: int) -> tuple[int, ...]:
    """The global batch rows of process ``process_index`` when each holds one contiguous block (the layout of a
    mesh over ``jax.devices()`` in their usual order). Raises ValueError when ``batch_size`` does not split."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count}: not a valid process index")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by the {process_count} processes")
    b = batch_size // process_count
    return tuple(range(process_index * b, (process_index + 1) * b))


def check_rows(rows: Sequence[int], batch_size: int) -> tuple[int, ...]:
    """``rows`` as a sorted tuple, checked: distinct global rows in ``[0, batch_size)``, at least one."""
    out = tuple(sorted(int(r) for r in rows))
    if not out or len(set(out)) != len(out) or out[0] < 0 or out[-1] >= batch_size:
        raise ValueError(f"process rows {list(rows)[:8]}...: want distinct rows in [0, {batch_size})")
    return out


class RowSelect(grain.MapDataset):
    """The elements of ``parent`` (a global example stream) at global positions ``k * batch_size + rows[j]``,
    in order of ``k`` then ``j``: one process's share of every global batch."""

    def __init__(self, parent: grain.MapDataset, rows: Sequence[int], batch_size: int):
        super().__init__(parent)
        self._rows = check_rows(rows, batch_size)
        self._batch = int(batch_size)
        full, rest = divmod(len(parent), self._batch)
        self._length = full * len(self._rows) + sum(r < rest for r in self._rows)

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        k, j = divmod(index, len(self._rows))
        return k * self._batch + self._rows[j]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._global_index(i) for i in indices])  # noqa: SLF001 - Grain's batch read

    def __str__(self) -> str:
        return f"RowSelect(rows={list(self._rows)}, batch_size={self._batch})"


def distinct_items(rows: Sequence[int], batch_size: int, n_items: int, shuffled: bool) -> int:
    """How many of the source's ``n_items`` items a process with these ``rows`` ever sees (the starvation
    check's window). Shuffled: every item (each epoch permutes them anew). Not shuffled: item ``i`` is at global
    positions ``i + e * n_items``, reachable iff ``i mod gcd(n_items, batch_size)`` is a row's residue."""
    if shuffled:
        return n_items
    d = math.gcd(n_items, batch_size)
    return (n_items // d) * len({r % d for r in rows})


# --------------------------------------------------------------------------------------------- iterator states


def consumed(state: dict) -> int | None:
    """Elements of its share a Grain iterator with this state has taken (before the skip filter), or None for a
    state this module does not know. Two forms: ``{"next_index": m}`` (reading in the process) and the
    multiprocessing prefetch's (``data.num_workers`` workers, worker ``i`` computing elements ``i, i + W, ...``:
    the sum of their ``next_index``)."""
    if set(state) == {"next_index"}:
        return int(state["next_index"])
    workers = state.get("iterators_in_use_states")
    if isinstance(workers, list) and all(isinstance(w, dict) and set(w) == {"next_index"} for w in workers):
        return sum(int(w["next_index"]) for w in workers)
    return None


def with_consumed(template: dict, m: int) -> dict | None:
    """A state of the same form as ``template`` (a fresh iterator's) that has consumed ``m`` elements, or None
    for an unknown form."""
    if set(template) == {"next_index"}:
        return {"next_index": int(m)}
    workers = template.get("iterators_in_use_states")
    if consumed(template) is None or not isinstance(workers, list) or not workers:
        return None
    w = len(workers)
    return dict(template, next_index_in_cycle=m % w,
                iterators_in_use_states=[{"next_index": len(range(i, m, w))} for i in range(w)])


def pack(states: Sequence[dict], rows: Sequence[Sequence[int]], batch_size: int) -> dict:
    """The data item of a checkpoint: every process's iterator state with its rows (JSON)."""
    return {"format": STATE_FORMAT, "batch_size": int(batch_size), "rows": [list(map(int, r)) for r in rows],
            "states": [dict(s) for s in states]}


def unpack(saved: dict) -> dict:
    """``saved`` in :func:`pack`'s form; a checkpoint from before it (one process's bare iterator state) is a
    single process holding every row (its batch size unknown: ``batch_size`` None)."""
    if saved.get("format") == STATE_FORMAT:
        return saved
    return {"format": STATE_FORMAT, "batch_size": None, "rows": None, "states": [dict(saved)]}


def reshard_states(saved: dict, rows: Sequence[int], batch_size: int, template: dict, process_index: int,
                   all_rows: Sequence[Sequence[int]]) -> dict:
    """This process's iterator state from a checkpoint's data item (:func:`pack`).

    Args:
      saved: the checkpoint's data item.
      rows: this process's rows now; ``all_rows``: every process's rows now (the layout).
      batch_size: the global batch now.
      template: a fresh iterator's state (the form to build).
      process_index: this process.

    Same layout: the process's own saved state, exact. Another one: the global batches the saved processes
    consumed, ``k``, continued as ``k * len(rows)`` elements of the new share; exact when no process had skipped an
    image (each consumed a whole number of local batches, all the same), else the stream goes on from the furthest
    process's next batch and a warning says so. Raises ValueError when the forms or batch sizes do not allow it.
    """
    saved = unpack(saved)
    states = saved["states"]
    now = [list(map(int, r)) for r in all_rows]
    if saved["rows"] is None:  # an older, single-process checkpoint
        if len(now) == 1:
            return states[0]
        saved = dict(saved, batch_size=batch_size, rows=[list(range(batch_size))])
    if saved["rows"] == now and saved["batch_size"] == batch_size:
        return states[process_index]
    if saved["batch_size"] != batch_size:
        raise ValueError(f"checkpoint data state: global batch {saved['batch_size']} when saved, {batch_size} now; "
                         f"the stream can only be continued with the same data.batch_size")
    counts = [consumed(s) for s in states]
    if any(c is None for c in counts):
        raise ValueError(f"checkpoint data state written by {len(states)} process(es) cannot be continued by "
                         f"{len(now)}: unknown iterator state form {sorted(states[0])}")
    local = [len(r) for r in saved["rows"]]
    batches = [-(-c // b) for c, b in zip(counts, local)]  # ceil: a batch begun is a batch done
    k = max(batches)
    if any(c != k * b for c, b in zip(counts, local)):
        logging.warning("data: the checkpoint's %d process(es) had consumed %s elements of their shares (skipped "
                        "images): on %d process(es) the stream continues at global batch %d", len(states), counts,
                        len(now), k)
    out = with_consumed(template, k * len(rows))
    if out is None:
        raise ValueError(f"data iterator state form {sorted(template)} cannot be set from a checkpoint written by "
                         f"{len(states)} process(es)")
    return out
