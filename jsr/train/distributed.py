"""Joining several processes into one JAX job: the hosts of a TPU pod slice, or several processes on one machine.

Every process runs the same ``train.py``; :func:`initialize` calls ``jax.distributed.initialize`` before JAX
touches a device. Where the processes come from:

- a TPU VM of a multi-host slice: JAX discovers the coordinator, the process count and this host's id itself;
- anywhere else: the coordinator address (``host:port`` of process 0), the process count and this process's id,
  from ``train.py``'s ``--coordinator_address/--num_processes/--process_id`` or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (flags win).

A process that dies (killed, out of memory, a crashed host) stops the others within ``heartbeat_timeout``
seconds, each with one line and exit status 2: ``error: process 1 of 2 stopped responding (no heartbeat for 30 s);
this process stops too`` (:class:`PeerWatch`). Why jsr keeps its own heartbeat: JAX's distributed runtime also
notices a dead peer, but it then ends every other process from C++ (``LOG(QFATAL)``, "Terminating process because
the JAX distributed service detected fatal errors ... another task died", exit status 134), which Python cannot
intercept. Its hook for that moment (``missed_heartbeat_callback`` of jaxlib's client, which
``jax.distributed.initialize`` does not expose) cannot call Python either in jaxlib 0.10.2: the status argument has
no Python type, so the call dies in ``std::bad_cast`` (tried, same exit status). So each process writes a counter
to the coordinator's key-value store every few seconds, a thread watches the others' counters, and JAX's own
timeout is set longer (:func:`jax_heartbeat_timeout`) as the backstop should the watching thread be starved: then
the job still stops, with JAX's abort. A process that ends normally says so first, so that its peers do not take
its silence for death; one that ends with an uncaught exception tells them it failed, and they stop at once
(``process 1 of 2 failed (its log says why)``) instead of waiting in a collective for it.

What Python cannot catch: when process 0 (the coordinator, whose key-value store and heartbeat service die with
it) is killed, the other processes' JAX agents fail their next poll of the service at once (connection reset)
and abort from C++ within a second ("Terminating process because the JAX distributed service detected fatal
errors ... Failed to send RPC to coordination service", exit status 134): bounded, but JAX's text, not jsr's.

Each process compiles its programs itself. (JAX can compile once and send the binary to the others,
``jax_share_binary_between_hosts``, but on CPU its cache keys differ between processes (jax 0.10.2): process 1
waits for a key process 0 never writes, and the job dies. Not used.)

The helpers the training loop needs across processes: :func:`any_process` (one flag agreed by all: stop at this
step?), :func:`gather_json` (every process's data-iterator state, for the checkpoint), :func:`batch_rows`
(which rows of each global batch a process's devices hold) and :func:`barrier`.

CPU collectives (gloo, what a rehearsal on one machine uses) set up each group of devices the first time a program
runs a collective over it, and give up when a process has not joined within 30 s (``Gloo context initialization
failed: DEADLINE_EXCEEDED``). Processes drift apart by more than that while they load a model or a compiled program
on a busy machine, so the loop meets at a :func:`barrier` (the coordinator's, no device involved) before the first
run of each program.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
# How long a barrier waits for the other processes: one may still be compiling a train step, many minutes on a
# loaded CPU. (A process that died ends the wait sooner: the heartbeat timeout stops the job.)
BARRIER_TIMEOUT_S = 90 * 60


class ClusterError(ValueError):
    """The multi-process job is described wrongly (a malformed address, count or id, or one of them missing):
    a user error, reported on one line."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-process job; ``None`` fields are left to JAX's auto-detection.

    Attributes:
      coordinator_address: ``host:port`` of process 0 (it serves there; the others connect).
      num_processes: how many processes the job has.
      process_id: this process, ``0 <= process_id < num_processes``.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and the job stops.
      init_timeout: seconds ``initialize`` waits for every process to join.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 100
    init_timeout: int = 300

    @property
    def explicit(self) -> bool:
        """Whether the job was described (an address or a process count) rather than left to detection."""
        return self.coordinator_address is not None or self.num_processes is not None


def _int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ClusterError(f"{name}={value!r}: not an integer") from None


def cluster_from(coordinator_address: str | None = None, num_processes: int | str | None = None,
                 process_id: int | str | None = None, heartbeat_timeout: int | None = None,
                 init_timeout: int | None = None, environ: Mapping[str, str] = os.environ) -> Cluster:
    """The :class:`Cluster` from explicit values (flags) and the environment (:data:`ENV`); explicit wins.

    Raises :class:`ClusterError` (one line, naming the setting) for a malformed address, count or id.
    """
    address = coordinator_address or environ.get(ENV["coordinator_address"]) or None
    n = _int("num_processes", num_processes if num_processes not in (None, "") else
             environ.get(ENV["num_processes"]))
    pid = _int("process_id", process_id if process_id not in (None, "") else environ.get(ENV["process_id"]))
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ClusterError(f"coordinator_address={address!r}: want host:port of process 0 (e.g. 10.0.0.2:8476)")
    if n is not None and n < 1:
        raise ClusterError(f"num_processes={n}: want at least 1")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ClusterError(f"process_id={pid}: want 0 <= process_id < num_processes ({n})")
    out = Cluster(address, n, pid)
    if heartbeat_timeout is not None:
        out = dataclasses.replace(out, heartbeat_timeout=int(heartbeat_timeout))
    if init_timeout is not None:
        out = dataclasses.replace(out, init_timeout=int(init_timeout))
    return out


def _on_tpu_pod(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("TPU_WORKER_HOSTNAMES"))


def initialize(cluster: Cluster | None = None, multihost: bool | None = None,
               environ: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-process job, if there is one; returns whether JAX runs distributed.

    ``multihost`` (``config.multihost``): True always joins (JAX detects what ``cluster`` leaves open), False
    never, None when ``cluster`` describes a job (an address or a process count, from flags or the environment)
    or a TPU pod's environment does. Must run before JAX uses a device; safe to call again.

    Raises :class:`ClusterError` when a described job lacks what JAX cannot detect off a TPU pod (address, count, id).
    """
    cluster = cluster_from(environ=environ) if cluster is None else cluster
    if jax.distributed.is_initialized():
        return True
    if multihost is None:
        multihost = cluster.explicit or _on_tpu_pod(environ)
    if not multihost:
        return False
    if cluster.explicit and not _on_tpu_pod(environ):
        missing = [k for k in ENV if getattr(cluster, k) is None]
        if missing:
            raise ClusterError(f"multi-process job: {', '.join(missing)} not given (train.py flags "
                             f"--{' --'.join(missing)} or ${' $'.join(ENV[k] for k in missing)})")
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes, process_id=cluster.process_id,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout(cluster.heartbeat_timeout),
                               initialization_timeout=cluster.init_timeout)
    logging.info("distributed: process %d of %d (coordinator %s), %d of %d devices here", jax.process_index(),
                 jax.process_count(), cluster.coordinator_address or "auto-detected", jax.local_device_count(),
                 jax.device_count())
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # the client JAX joined with

        PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                  cluster.heartbeat_timeout).start()
    return True


def jax_heartbeat_timeout(timeout_s: int) -> int:
    """JAX's own heartbeat timeout for jsr's ``timeout_s``: later, so that :class:`PeerWatch` reports a dead peer
    first and JAX's C++ abort only backs it up."""
    return int(timeout_s) + max(10, int(timeout_s) // 2)


class PeerWatch(threading.Thread):
    """Ends this process (one ``error:`` line on stderr, exit status 2) when another process of the job stops
    responding for ``timeout_s`` seconds; see the module docstring for why JAX's own heartbeat is not enough.

    Every ``interval_s`` (default: a tenth of the timeout, 1 to 10 s) the thread writes this process's counter to
    the coordination service's key-value store and reads every other process's: a counter that has not moved for
    ``timeout_s`` (by this process's clock: no clocks are compared) means that process is dead or hung; the store
    itself failing for ``timeout_s`` means the coordinator, process 0, is gone. A process that ends normally
    writes ``exit`` first (:meth:`finish`, run at interpreter exit); its peers then stop watching it. An uncaught
    exception writes ``failed`` (:meth:`failed`, from ``sys.excepthook``): the peers stop with a line naming it.
    ``exit_fn`` ends the process (``os._exit``: other threads may be blocked in a collective on the
    dead peer; tests pass their own).
    """

    KEY = "jsr/alive/{}"

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout_s: float,
                 interval_s: float | None = None, exit_fn: Any = None):
        super().__init__(name="jsr-peer-watch", daemon=True)
        self.client, self.process_id, self.num_processes = client, int(process_id), int(num_processes)
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else min(10.0, max(1.0, self.timeout_s / 10))
        self.exit_fn = exit_fn or os._exit
        self._stop_event = threading.Event()
        self.message: str | None = None

    def start(self) -> None:
        import atexit

        atexit.register(self.finish)  # after jax's own atexit shutdown is registered: runs before it
        previous = sys.excepthook

        def hook(kind, error, tb):
            self.failed(error)
            previous(kind, error, tb)
        sys.excepthook = hook
        super().start()

    def _tell(self, value: str) -> None:
        try:
            self.client.key_value_set(self.KEY.format(self.process_id), value, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing left to tell
            pass

    def finish(self) -> None:
        """Stop watching and tell the others this process ended on purpose (unless :meth:`failed` said
        otherwise)."""
        if not self._stop_event.is_set():
            self._stop_event.set()
            self._tell("exit")

    def failed(self, error: BaseException) -> None:
        """This process ends with an uncaught exception. A JAX runtime error is often a collective that lost a
        peer: the watch first gets the time to name the dead peer (and exit 2 with its line). Then the others are
        told this process failed, so they stop at once instead of waiting in a collective."""
        if isinstance(error, jax.errors.JaxRuntimeError) and self.is_alive():
            self.join(self.timeout_s + 2 * self.interval_s)
        self._stop_event.set()
        self._tell("failed")

    def _die(self, message: str) -> None:
        self.message = message
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.exit_fn(2)

    def run(self) -> None:
        peers = [p for p in range(self.num_processes) if p != self.process_id]
        seen: dict[int, str | None] = {p: None for p in peers}
        moved = {p: time.monotonic() for p in peers}
        done: set[int] = set()
        store_ok = time.monotonic()
        count = 0
        while not self._stop_event.is_set():
            count += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(self.KEY.format(self.process_id), str(count), allow_overwrite=True)
                values = {}
                for p in peers:
                    if p in done:
                        continue
                    try:
                        values[p] = self.client.key_value_try_get(self.KEY.format(p))
                    except Exception as e:  # noqa: BLE001 - not written yet (NOT_FOUND); other errors re-raise
                        if "NOT_FOUND" not in str(e) and "not found" not in str(e).lower():
                            raise
                store_ok = now
            except Exception:  # noqa: BLE001 - the store is unreachable: the coordinator may be gone
                if self._stop_event.is_set():
                    return
                if now - store_ok > self.timeout_s:
                    self._die(f"process 0 of {self.num_processes} (the coordinator) stopped responding (no answer "
                              f"for {self.timeout_s:.0f} s); this process stops too")
                    return
                self._stop_event.wait(self.interval_s)
                continue
            for p, value in values.items():
                if value == "exit":
                    done.add(p)
                elif value == "failed":
                    self._die(f"process {p} of {self.num_processes} failed (its log says why); this process "
                              "stops too")
                    return
                elif value != seen[p]:
                    seen[p], moved[p] = value, now
            for p in peers:
                if p not in done and now - moved[p] > self.timeout_s:
                    self._die(f"process {p} of {self.num_processes} stopped responding (no heartbeat for "
                              f"{self.timeout_s:.0f} s); this process stops too")
                    return
            self._stop_event.wait(self.interval_s)


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has reached the barrier ``name`` (every process must pass the same barriers in
    the same order). Through the coordination service, not a device collective. Free on a single process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client JAX joined with (as Orbax's barriers use it)

    key = f"jsr/{name}/{next(_BARRIERS)}"
    jax_distributed.global_state.client.wait_at_barrier(key, int(timeout_s * 1000))


def device_put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` for a tree every process holds the same copy of (parameters, a fresh
    train state). On several processes each builds only its devices' shards from its own copy: ``device_put``
    would first check that the copies agree by gathering every array across processes (a device collective per
    leaf: the whole model through the network, and a compile for each shape)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a collective: every process must call it at the same
    point, e.g. each step boundary). Free on a single process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable ``value``, in process order, on every process (a collective)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:s]).decode()) for r, s in zip(rows, sizes)]


def batch_rows(sharding: jax.sharding.Sharding, global_batch: int) -> list[tuple[int, ...]]:
    """For each process, the rows of a ``[global_batch, ...]`` array with ``sharding`` that its devices hold,
    sorted: where ``jax.make_array_from_process_local_data`` puts that process's local batch."""
    rows: list[set[int]] = [set() for _ in range(jax.process_count())]
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows[device.process_index].update(range(*index[0].indices(global_batch)))
    return [tuple(sorted(r)) for r in rows]


def describe(rows: Sequence[Sequence[int]]) -> str:
    """``rows`` in a log line: ``p0 [0, 4), p1 [4, 8)`` when each process holds one block."""
    parts = []
    for p, r in enumerate(rows):
        block = len(r) and list(r) == list(range(r[0], r[0] + len(r)))
        parts.append(f"p{p} [{r[0]}, {r[-1] + 1})" if block else f"p{p} {list(r)}")
    return ", ".join(parts)
