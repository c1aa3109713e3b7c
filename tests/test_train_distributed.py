"""How a process learns its place in a multi-process job (train.py flags beside the environment), the one-line
errors for a job described wrongly, and the single-process behaviour of the cross-process helpers. The
multi-process runs themselves are in tests/test_multihost.py (-m slow)."""
import subprocess
import sys
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
