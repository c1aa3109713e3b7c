"""How a process learns its place in a multi-process job (train.py flags beside the environment), the one-line
errors for a job described wrongly, and the single-process behaviour of the cross-process helpers. The
multi-process runs themselves are in tests/test_multihost.py (-m slow)."""
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

from jsr.train import distributed as D
from jsr.train import sharding

ROOT = Path(__file__).resolve().parents[1]
ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}


def test_cluster_from_flags_and_environment():
    assert D.cluster_from(environ={}) == D.Cluster()
    assert not D.Cluster().explicit
    c = D.cluster_from(environ=ENV)
    assert (c.coordinator_address, c.num_processes, c.process_id) == ("10.0.0.2:8476", 4, 3) and c.explicit
    c = D.cluster_from("127.0.0.1:1234", 2, 0, heartbeat_timeout=10, environ=ENV)  # flags win
    assert (c.coordinator_address, c.num_processes, c.process_id, c.heartbeat_timeout) == ("127.0.0.1:1234", 2, 0, 10)


@pytest.mark.parametrize("kw,match", [(dict(coordinator_address="10.0.0.2"), "want host:port"),
                                      (dict(num_processes=0), "at least 1"),
                                      (dict(num_processes=2, process_id=2), r"0 <= process_id < num_processes \(2\)"),
                                      (dict(num_processes="two"), "not an integer")])
def test_malformed_jobs_are_named(kw, match):
    with pytest.raises(D.ClusterError, match=match):
        D.cluster_from(environ={}, **kw)


def test_a_job_missing_its_coordinator_is_an_error_before_jax_is_asked():
    with pytest.raises(D.ClusterError, match="coordinator_address, process_id not given"):
        D.initialize(D.Cluster(num_processes=2), environ={})
    assert D.initialize(D.Cluster(), environ={}) is False  # nothing described: a single process
    assert D.initialize(D.Cluster(num_processes=2), multihost=False, environ={}) is False


def test_train_py_reports_a_bad_job_on_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/fidelity.py:tiny", "--workdir",
                        str(tmp_path), "--num_processes=2", "--process_id=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: multi-process job: coordinator_address not given (train.py flags --coordinator_address or "
        "$JAX_COORDINATOR_ADDRESS)")
    assert "Traceback" not in r.stderr


def test_single_process_helpers():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    assert D.batch_rows(sharding.batch_sharding(mesh, 1), 16) == [tuple(range(16))]
    assert D.describe([(0, 1, 2, 3), (4, 5, 6, 7)]) == "p0 [0, 4), p1 [4, 8)"
    assert D.describe([(0, 2), (1, 3)]) == "p0 [0, 2], p1 [1, 3]"
    assert D.any_process(True) and not D.any_process(False)
    assert D.gather_json({"next_index": 3}) == [{"next_index": 3}]
    D.barrier("nothing to wait for")
    assert jax.process_count() == 1


class _Store:
    """A stand-in for the coordination service's key-value store (what PeerWatch uses of jaxlib's client); a
    process's counter moves when ``tick`` is called, and ``down`` makes every call fail as a dead coordinator's."""

    def __init__(self):
        self.values, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        self.values[key] = value

    def key_value_try_get(self, key):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
        if key not in self.values:
            raise RuntimeError(f"NOT_FOUND: {key}")
        return self.values[key]


def _watch(store, timeout=0.4):
    exits = []
    w = D.PeerWatch(store, 0, 3, timeout, interval_s=0.02, exit_fn=exits.append)
    return w, exits


@pytest.mark.parametrize("case", ["dead", "failed", "coordinator"])
def test_peer_watch_names_the_peer_that_stopped(case):
    """Process 1's counter stops (killed), or it says it failed, or the store itself is gone: the watch of process
    0 ends it with one line and status 2, within the timeout; process 2 keeps beating, then ends normally."""
    store = _Store()
    w, exits = _watch(store)
    threading.Thread.start(w)  # the thread only: no atexit/excepthook for a test
    beat = itertools.count()
    start = time.monotonic()
    while w.is_alive() and time.monotonic() - start < 5:
        store.values["jsr/alive/2"] = str(next(beat))
        if case == "dead" and time.monotonic() - start < 0.2:
            store.values["jsr/alive/1"] = str(next(beat))
        if case == "failed":
            store.values["jsr/alive/1"] = "failed"
        if case == "coordinator" and time.monotonic() - start > 0.2:
            store.down = True
        time.sleep(0.01)
    took = time.monotonic() - start
    w.join(1)
    assert exits == [2]
    assert w.message == {"dead": "process 1 of 3 stopped responding (no heartbeat for 0 s); this process stops too",
                         "failed": "process 1 of 3 failed (its log says why); this process stops too",
                         "coordinator": "process 0 of 3 (the coordinator) stopped responding (no answer for 0 s); "
                                        "this process stops too"}[case]
    assert took < {"dead": 0.2 + 0.4 + 0.3, "failed": 0.3, "coordinator": 0.2 + 0.4 + 0.3}[case]


def test_peer_watch_ignores_a_peer_that_ended():
    """A peer that ended normally ('exit') is not taken for dead, however long this process goes on; this
    process's own finish() writes 'exit' and stops its watch."""
    store = _Store()
    store.values.update({"jsr/alive/1": "exit", "jsr/alive/2": "exit"})
    w, exits = _watch(store, timeout=0.1)
    threading.Thread.start(w)
    time.sleep(0.4)
    w.finish()
    w.join(1)
    assert not w.is_alive() and exits == [] and store.values["jsr/alive/0"] == "exit"
    assert D.jax_heartbeat_timeout(100) == 150 and D.jax_heartbeat_timeout(10) == 20  # JAX's abort comes later
