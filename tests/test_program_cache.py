"""jsr.train.program_cache: a traced program is written once and read back by a rerun (no trace), gives the same
results as the plain jit, and is traced anew whenever anything in its key changes or the artefact is damaged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.train import program_cache as pc
from jsr.train.step import TrainState


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The artefacts' folder moved to a temporary one (JAX's compilation cache itself stays the session's)."""
    monkeypatch.setattr(pc, "program_folder", lambda: tmp_path / "jsr-programs")
    return tmp_path / "jsr-programs"


TRACES: list[int] = []


def make_step():
    """A new function object each time, as in a new process (JAX's in-memory trace cache is per function)."""

    def step(state: TrainState, batch: dict):
        TRACES.append(1)  # runs once per trace
        w = state.params["w"] * jnp.tanh(batch["x"]).sum() + state.step
        return (TrainState(step=state.step + 1, rng=state.rng, params={"w": w}, opt_state=state.opt_state,
                           nonfinite=state.nonfinite), {"loss": jnp.mean(w ** 2)})

    return step


def fresh_state(n: int = 3) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jnp.zeros(2, jnp.uint32),
                      params={"w": jnp.arange(n, dtype=jnp.float32)}, opt_state={"m": jnp.ones(n)},
                      nonfinite=jnp.zeros((), jnp.int32))


def run(description: str = "d", n: int = 3, x: float = 0.5):
    program = pc.cached_jit(make_step(), name="toy-step", description=description, donate_argnums=0)
    state, metrics = program(fresh_state(n), {"x": jnp.full((2, 4), x)})
    return program, state, metrics


def test_a_rerun_reads_the_program_back_without_tracing(cache_dir):
    TRACES.clear()
    first, s1, m1 = run()
    assert first.source == "traced" and len(TRACES) == 1
    assert len(list(cache_dir.glob(f"toy-step-*{pc.SUFFIX}"))) == 1
    second, s2, m2 = run()  # a new CachedProgram of a new function: as a new process would
    assert second.source == "disk" and len(TRACES) == 1  # not traced again
    plain_state, plain_metrics = jax.jit(make_step())(fresh_state(), {"x": jnp.full((2, 4), 0.5)})
    for got in ((s1, m1), (s2, m2)):
        np.testing.assert_array_equal(got[0].params["w"], plain_state.params["w"])
        np.testing.assert_array_equal(got[1]["loss"], plain_metrics["loss"])
        assert isinstance(got[0], TrainState) and int(got[0].step) == 1


@pytest.mark.parametrize("change", ["description", "shape", "source"])
def test_anything_in_the_key_changing_traces_again(cache_dir, monkeypatch, change):
    TRACES.clear()
    run()
    if change == "description":
        program, _, _ = run(description="another config")
    elif change == "shape":
        program, _, _ = run(n=5)
    else:
        monkeypatch.setattr(pc, "source_digest", lambda: "edited jsr code")
        program, _, _ = run()
    assert program.source == "traced" and len(TRACES) == 2
    assert len(list(cache_dir.glob(f"toy-step-*{pc.SUFFIX}"))) == 2


def test_a_damaged_artefact_is_traced_again(cache_dir):
    TRACES.clear()
    run()
    (path,) = cache_dir.glob(f"toy-step-*{pc.SUFFIX}")
    path.write_bytes(b"not a program")
    program, state, _ = run()
    assert program.source == "traced" and len(TRACES) == 2
    assert float(state.params["w"][1]) == pytest.approx(np.tanh(0.5) * 8)


def test_no_compilation_cache_means_no_artefact(monkeypatch):
    monkeypatch.setattr(pc, "program_folder", lambda: None)
    program, state, _ = run()
    assert program.source == "jit" and int(state.step) == 1


def test_the_folder_follows_the_compilation_cache():
    where = jax.config.jax_compilation_cache_dir  # conftest: the session's cache
    assert where and pc.program_folder() == pc.Path(where) / "jsr-programs"


def test_the_key_sees_static_tree_fields(cache_dir):
    """A LoRA's rank and alpha are static fields of its node: a different alpha is a different trace."""
    from jsr.models.lora import LoRA

    def key(alpha):
        lora = LoRA(factors={"a": jnp.ones(2)}, rank=4, alpha=alpha)
        return pc.program_key("n", "d", (lora,))

    assert key(8.0) != key(4.0) and key(8.0) == key(8.0)
