"""A TPU pod rehearsed on one machine: ``train.py`` as 2 processes x 4 CPU devices (a local coordinator, gloo
collectives) trains the tiny fidelity method on a ``data=2, fsdp=4`` mesh exactly like 1 process x 8 devices.

Checked, each on real ``train.py`` processes (``tests/multihost_worker.py`` records every local batch and the final
train state):

- the final train state (LoRA parameters, AdamW moments, step, RNG) equals the single process's;
- each process reads its half of every global batch, the halves are disjoint and together are the single-process
  batch, row for row;
- a checkpoint written by 2 processes resumes in 1 (and the reverse), continuing the state and the data stream as
  the uninterrupted run did;
- SIGTERM to one process stops both at the same step, with one checkpoint;
- a process killed outright makes the other exit within the heartbeat timeout, with jsr's one line naming it and
  status 2 (jsr.train.distributed.PeerWatch; JAX's own C++ abort is only the backstop).

``-m slow``: each run starts 1 or 2 processes that load the tiny model and compile (or load) the train step on the
shared 2-core CPU. Runs share compiled programs through the session's persistent XLA cache (conftest.py): the
8-device program is compiled once (run A; run C loads it), the 2x4 one once per process (run B; runs D, E, F load
it). The two processes of a job cannot share one compile: on CPU their cache keys differ (jsr.train.distributed).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import device_xla_flags

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--config", "configs/fidelity.py:tiny", "--config.loss.lpips=0", "--config.total_steps=4",
         "--config.checkpoint.every=2", "--config.log.image_every=0", "--config.mesh.data=2",
         "--config.mesh.fsdp=4", "--config.data.batch_size=8",
         # AdamW's eps 1e-8 turns the round-off of a gradient that cancels to ~1e-10 into an update of ~lr: one
         # LoRA entry in 128 differed by 2.8e-6 (2026-11-30, the numpy-drawn tiny model); 1e-6 bounds that
         # amplification at lr / eps = 50, as test_train_loop's sharded-step test does.
         "--config.optim.eps=1e-6"]
RUN_TIMEOUT = 3600  # a cold compile on the loaded 2-core CPU takes many minutes; a hang still ends the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``nproc`` worker processes of one ``train.py`` job, ``8 // nproc`` CPU devices each, recording under
    ``out``."""

    def __init__(self, out: Path, nproc: int, workdir: Path, *extra: str):
        self.out, self.nproc = out, nproc
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, XLA_FLAGS=device_xla_flags(8 // nproc), PYTHONUNBUFFERED="1")
        cluster = []
        if nproc > 1:
            cluster = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={nproc}"]
        self.procs = []
        for p in range(nproc):
            ids = [f"--process_id={p}"] if nproc > 1 else []
            cmd = [sys.executable, "tests/multihost_worker.py", str(out / f"p{p}"), *FLAGS,
                   f"--workdir={workdir}", *cluster, *ids, *extra]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / f"out{p}", "w"),
                                               stderr=open(out / f"err{p}", "w")))

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def text(self, kind: str, p: int) -> str:
        return (self.out / f"{kind}{p}").read_text()

    def batches(self, p: int) -> list[list[str]]:
        path = self.out / f"p{p}.batches.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def state(self) -> dict[str, np.ndarray]:
        with np.load(self.out / "p0.state.npz") as f:
            return dict(f)

    def check(self, codes: list[int]) -> None:
        assert codes == [0] * self.nproc, "\n".join(self.text("err", p)[-3000:] for p in range(self.nproc))


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _copy_checkpoint(src: Path, step: int, dst: Path) -> Path:
    """A fresh workdir holding only ``src``'s checkpoint ``step``: a run there resumes from it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))
    return dst


# Not bit-identical: two processes reduce gradients through gloo, one process through XLA's in-process all-reduce,
# the same sums in another order. Measured (2026-11-30) after 4 steps: 7 of 582 float leaves identical, parameters
# within 6e-8 (1 ulp of the LoRA factors), AdamW's first moments within 6.9e-8 (1.6e-6 of their largest value). The
# tolerance is the sharded-step test's (test_train_loop): f32 round-off of the gradients as AdamW turns it into
# updates; integer leaves (step, RNG key data, counts) must be equal.
RTOL, ATOL = 1e-5, 1e-6


def _assert_states_match(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if want[k].dtype.kind in "iu":  # step counters, RNG key data: exact
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A (1 process x 8 devices) and run B (2 processes x 4 devices), 4 steps each, checkpoints at 2 and 4."""
    from jsr.weights.tiny import default_tiny_sd_dir, write_tiny_sd

    write_tiny_sd(default_tiny_sd_dir().with_name("tiny-sd-0"))  # once, before processes race to write it
    root = tmp_path_factory.mktemp("multihost")
    a = Job(root / "a", 1, root / "a" / "w")
    a.check(a.wait())
    b = Job(root / "b", 2, root / "b" / "w")
    b.check(b.wait())
    return root, a, b


def test_two_processes_train_like_one(runs):
    _, a, b = runs
    for p in range(2):
        assert "training done at step 4" in b.text("out", p)
    single = a.batches(0)
    halves = [b.batches(0), b.batches(1)]
    assert len(single) == 4 and all(len(h) == 4 for h in halves)
    for step in range(4):
        assert len(halves[0][step]) == len(halves[1][step]) == 4
        assert not set(halves[0][step]) & set(halves[1][step])  # disjoint
        assert halves[0][step] + halves[1][step] == single[step]  # rows 0-3 and 4-7 of the same global batch
    got, want = b.state(), a.state()
    _assert_states_match(got, want)
    diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want if want[k].dtype.kind == "f")
    print(f"2x4 vs 1x8 after 4 steps: max |diff| {diff:.3g}")


def test_checkpoints_move_between_process_counts(runs):
    root, a, b = runs
    # 2 processes -> 1: B's step-2 checkpoint, resumed by one process with 8 devices.
    c = Job(root / "c", 1, _copy_checkpoint(root / "b" / "w", 2, root / "c" / "w"))
    c.check(c.wait())
    assert c.batches(0) == a.batches(0)[2:]  # the stream goes on where it stopped
    _assert_states_match(c.state(), a.state())
    # 1 process -> 2: A's step-2 checkpoint, resumed by two processes with 4 devices each.
    d = Job(root / "d", 2, _copy_checkpoint(root / "a" / "w", 2, root / "d" / "w"))
    d.check(d.wait())
    for step in range(2):
        assert d.batches(0)[step] + d.batches(1)[step] == a.batches(0)[2 + step]
    _assert_states_match(d.state(), b.state())


def _wait_for_batches(job: Job, p: int, n: int, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while len(job.batches(p)) < n:
        assert all(q.poll() is None for q in job.procs), job.text("err", p)[-3000:]
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.5)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(runs):
    root = runs[0]
    work = root / "e" / "w"
    e = Job(root / "e", 2, work, "--config.total_steps=1000", "--config.checkpoint.every=1000")
    _wait_for_batches(e, 1, 3)  # training: steps 0 and 1 done or under way
    e.procs[1].send_signal(signal.SIGTERM)  # a pod's hosts are preempted one by one: only this one is told
    e.check(e.wait(timeout=600))
    stops = {e.text("out", p).split("training preempted at step ")[1].split(";")[0] for p in range(2)}
    assert len(stops) == 1, stops  # the same step on both
    step = int(stops.pop())
    assert _checkpoints(work) == [step]  # one checkpoint, at that step
    assert len(e.batches(0)) == len(e.batches(1)) == step  # one batch per step taken, none beyond


def test_a_dying_process_stops_the_other(runs):
    root = runs[0]
    f = Job(root / "f", 2, root / "f" / "w", "--config.total_steps=1000", "--config.checkpoint.every=1000",
            "--heartbeat_timeout=10")
    _wait_for_batches(f, 1, 3)
    f.procs[1].kill()  # SIGKILL: no goodbye
    t0 = time.monotonic()
    try:
        code = f.procs[0].wait(timeout=120)
    finally:
        f.wait(timeout=1)
    took = time.monotonic() - t0
    err = f.text("err", 0)
    print(f"process 0 exited {took:.1f} s after process 1 was killed (heartbeat timeout 10 s), status {code}")
    assert code == 2, err[-3000:]
    assert ("error: process 1 of 2 stopped responding (no heartbeat for 10 s); this process stops too"
            in err.splitlines()), err[-3000:]
    # The watch fires between timeout - interval (1 s) and timeout + interval after the last heartbeat it saw;
    # 10 s of slack for a loaded 2-core machine. JAX's own abort would come at 15 s (jax_heartbeat_timeout).
    assert took < 10 + 1 + 10
