"""Joining several processes into one JAX job: the hosts of a TPU pod slice, or several processes on one machine.

Every process runs the same ``train.py``; :func:`initialize` calls ``jax.distributed.initialize`` before JAX
touches a device. Where the processes come from:

- a TPU VM of a multi-host slice: JAX discovers the coordinator, the process count and this host's id itself;
- anywhere else: the coordinator address (``host:port`` of process 0), the process count and this process's id,
  from ``train.py``'s ``--coordinator_address/--num_processes/--process_id`` or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (flags win).

A process that dies (killed, out of memory, a crashed host) stops the others: JAX's distributed runtime notices
its missing heartbeats within ``heartbeat_timeout`` seconds and ends every other process with "Terminating process
because the JAX distributed service detected fatal errors ... another task died" (exit status 134, SIGABRT), so a
job never hangs on a lost peer.

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
                               heartbeat_timeout_seconds=cluster.heartbeat_timeout,
                               initialization_timeout=cluster.init_timeout)
    logging.info("distributed: process %d of %d (coordinator %s), %d of %d devices here", jax.process_index(),
                 jax.process_count(), cluster.coordinator_address or "auto-detected", jax.local_device_count(),
                 jax.device_count())
    return True


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
