"""The generic train step: updates apply in order, non-finite updates are dropped, accumulation is exact,
and a sharded step equals the single-device step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsr.train import sharding
from jsr.train.step import Update, init_state, make_optimizer, make_train_step


def _regression_loss(params, frozen, batch, rng, carry):
    pred = batch["x"] @ params["w"]["kernel"] + frozen["bias"]
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, ({"mse": loss}, pred)


def _second_loss(params, frozen, batch, rng, carry):
    # Trains "v" to follow the first update's (stopped) predictions: exercises the carry.
    loss = jnp.mean(jnp.square(jax.lax.stop_gradient(carry) * params["v"]["scale"] - batch["y"]))
    return loss, ({"follow": loss}, carry)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    params = {"w": {"kernel": jnp.zeros((3, 2))}, "v": {"scale": jnp.ones(())}}
    frozen = {"bias": jnp.asarray([0.5, -0.5])}
    updates = [Update("w", _regression_loss, make_optimizer(1e-1, weight_decay=0.0)),
               Update("v", _second_loss, optax.sgd(1e-2))]
    return batch, params, frozen, updates


def test_updates_lower_the_loss_and_carry_flows():
    batch, params, frozen, updates = _setup()
    state = init_state(params, updates, seed=0)
    step = jax.jit(make_train_step(updates))
    for _ in range(150):
        state, m = step(state, frozen, batch)
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"]) - np.asarray(frozen["bias"])
    optimum = np.mean(np.square(x @ np.linalg.lstsq(x, y, rcond=None)[0] - y))
    assert float(m["w/mse"]) < optimum * 1.02  # AdamW (lr 0.1) reaches the least-squares optimum
    assert int(state.step) == 150 and float(m["w/skipped"]) == 0.0
    assert float(state.params["v"]["scale"]) != 1.0  # the second update trained on the carried predictions


def test_nonfinite_update_is_dropped_and_counted():
    batch, params, frozen, updates = _setup()
    state = init_state(params, updates, seed=0)
    step = jax.jit(make_train_step(updates))
    bad = dict(batch, y=batch["y"].at[0, 0].set(jnp.nan))
    new, m = step(state, frozen, bad)
    assert float(m["w/skipped"]) == 1.0 and int(new.nonfinite) == 1
    np.testing.assert_array_equal(new.params["w"]["kernel"], state.params["w"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, new.opt_state["w"], state.opt_state["w"])
    new2, _ = step(new, frozen, bad)
    assert int(new2.nonfinite) == 2
    new3, m3 = step(new2, frozen, batch)
    assert int(new3.nonfinite) == 0 and float(m3["w/skipped"]) == 0.0


def test_accumulation_equals_the_full_batch_step():
    batch, params, frozen, updates = _setup()
    updates = updates[:1]
    s1, m1 = jax.jit(make_train_step(updates))(init_state(params, updates, 0), frozen, batch)
    s2, m2 = jax.jit(make_train_step(updates, accum_steps=4))(init_state(params, updates, 0), frozen, batch)
    # Mean losses over equal micro-batches: the averaged gradient is the full-batch gradient (f32 round-off).
    np.testing.assert_allclose(s1.params["w"]["kernel"], s2.params["w"]["kernel"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["w/loss"], m2["w/loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="does not split"):
        jax.jit(make_train_step(updates, accum_steps=3))(init_state(params, updates, 0), frozen, batch)


def test_sharded_step_equals_single_device():
    batch, params, frozen, updates = _setup()
    state = init_state(params, updates, seed=0)
    step = make_train_step(updates)
    ref, mref = jax.jit(step)(state, frozen, batch)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    rep = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: rep, state)
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    out, m = jax.jit(step, in_shardings=(state_sh, rep, batch_sh), out_shardings=(state_sh, rep),
                     donate_argnums=0)(jax.device_put(state, state_sh), frozen, jax.device_put(batch, batch_sh))
    np.testing.assert_allclose(out.params["w"]["kernel"], ref.params["w"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(m["w/loss"], mref["w/loss"], rtol=1e-5)


def test_optimizer_schedules():
    assert make_optimizer(1e-3, schedule="cosine", total_steps=10, warmup_steps=2) is not None
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(1e-3, schedule="cosine")
    with pytest.raises(ValueError, match="unknown lr schedule"):
        make_optimizer(1e-3, schedule="step")
