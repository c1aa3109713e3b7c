"""Orbax checkpoints: round trip with data state, keep-N, half-written steps ignored, SIGTERM watch."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.train.checkpoint import Checkpointer, PreemptionWatch


def _state(v):
    return {"lora": {"a": jnp.full((3, 2), v), "b": jnp.zeros((2, 3))}, "step": jnp.asarray(int(v), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(int(v)))}


def test_roundtrip_keep_and_latest(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, every=10)
    assert ck.latest_step() is None
    assert not ck.save(5, _state(5.0))  # not on the interval
    for s in (10, 20, 30):
        assert ck.save(s, _state(float(s)), {"epoch": s // 10, "next_index": s * 4})
    ck.wait()
    assert ck.all_steps() == [20, 30] and ck.latest_step() == 30
    abstract = jax.eval_shape(lambda: _state(0.0))
    state, data = ck.restore(abstract)
    np.testing.assert_array_equal(state["lora"]["a"], np.full((3, 2), 30.0))
    assert int(state["step"]) == 30 and data == {"epoch": 3, "next_index": 120}
    state20, _ = ck.restore(abstract, step=20)
    assert float(state20["lora"]["a"][0, 0]) == 20.0
    assert not ck.save(30, _state(99.0), force=True)  # an existing step is never overwritten
    ck.close()


def test_half_written_checkpoint_is_never_restored(tmp_path):
    ck = Checkpointer(tmp_path, keep=3, every=1, async_save=False)
    ck.save(1, _state(1.0))
    ck.wait()
    # What a process killed mid-save leaves behind: Orbax's temporary directory, never renamed into place.
    tmp = tmp_path / "2.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    ck2 = Checkpointer(tmp_path, keep=3, every=1)
    assert ck2.latest_step() == 1
    state, _ = ck2.restore(jax.eval_shape(lambda: _state(0.0)))
    assert int(state["step"]) == 1
    ck2.close()
    ck.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Checkpointer(tmp_path / "none").restore(jax.eval_shape(lambda: _state(0.0)))


def test_preemption_watch_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch() as watch:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.requested
    assert signal.getsignal(signal.SIGTERM) is before
