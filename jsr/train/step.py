"""Train state and the generic jitted train step.

A training method (``jsr.methods``) is a list of :class:`Update` s applied in order in one step, each
differentiating its own loss w.r.t. one *group* of trainable trees with its own optimizer: OSEDiff's generator
update (LoRA trees + the full ``conv_in``) followed by its fake-score update; CTSR's single student update.
A later update sees the parameters the earlier ones produced and a ``carry`` they returned (e.g. the
generator's output latent that the fake score trains on).

Robustness: an update whose loss or gradients are not finite is not applied (parameters and optimizer state
stay as they were) and ``nonfinite`` counts it; the loop stops a run that keeps producing them.

Gradient accumulation: with ``accum_steps > 1`` the batch is split into that many micro-batches along its
leading axis and their gradients are averaged (a ``lax.scan``, so memory is one micro-batch's).

The step number: every loss sees ``batch["step"]``, the int32 count of completed steps (``state.step``, traced;
FiDeSR's DAW ramps its weighting in with it). Scalars in the batch go to every micro-batch unchanged.

The mesh: a step made for a mesh traces inside ``jsr.train.sharding.tracing`` (the mesh in context for the
attention dispatch, activation constraints by the rules), whoever jits, lowers or exports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jsr.methods.api import LossFn, Update  # noqa: F401 - the step runs the methods' updates
from jsr.methods.common import make_optimizer  # noqa: F401 - re-exported for older imports
from jsr.train import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the frozen base and the data iterator.

    Attributes:
      step: int32 scalar, completed steps.
      rng: uint32 raw PRNG key data (``jax.random.key_data``), checkpointable as a plain array.
      params: ``{group: tree}`` of trainable float32 trees (LoRA factors, fully trained tensors).
      opt_state: ``{group: optax state}``.
      nonfinite: int32 scalar, consecutive steps with a skipped (non-finite) update.
    """

    step: jax.Array
    rng: jax.Array
    params: dict[str, Any]
    opt_state: dict[str, Any]
    nonfinite: jax.Array


def init_state(params: Mapping[str, Any], updates: Sequence[Update], seed: int) -> TrainState:
    """A fresh state for ``params`` (``{group: tree}``) with each update's optimizer initialised."""
    opt_state = {u.group: u.optimizer.init(params[u.group]) for u in updates}
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)),
                      params=dict(params), opt_state=opt_state, nonfinite=jnp.zeros((), jnp.int32))


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> Mapping[str, jax.Array]:
    def split(x):
        if x.ndim == 0:  # a per-step scalar (the step number): the same for every micro-batch
            return jnp.broadcast_to(x, (n,))
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split into {n} accumulation steps")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


def _grads(update: Update, params, frozen, batch, rng, carry, accum_steps: int):
    def loss_of(group_tree, b, r, c):
        all_params = dict(params, **{update.group: group_tree})
        return update.loss(all_params, frozen, b, r, c)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum_steps == 1:
        (loss, (parts, carry)), grads = grad_fn(params[update.group], batch, rng, carry)
        return loss, parts, carry, grads

    micro = _split_micro(batch, accum_steps)
    rngs = jax.random.split(rng, accum_steps)
    carries = carry if carry is None else _split_micro(carry, accum_steps)

    def body(acc, xs):
        b, r, c = xs
        (loss, (parts, c_out)), g = grad_fn(params[update.group], b, r, c)
        acc = jax.tree.map(lambda a, x: a + x / accum_steps, acc, (loss, parts, g))
        return acc, c_out

    zeros = jax.tree.map(jnp.zeros_like, params[update.group])
    (loss0, (parts0, _)) = jax.eval_shape(lambda: loss_of(params[update.group], jax.tree.map(lambda x: x[0], micro),
                                                          rngs[0], None if carries is None else
                                                          jax.tree.map(lambda x: x[0], carries)))
    init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts0), zeros)
    (loss, parts, grads), c_out = jax.lax.scan(body, init, (micro, rngs, carries))
    carry = None if c_out is None else jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), c_out)
    return loss, parts, carry, grads


def make_train_step(updates: Sequence[Update], accum_steps: int = 1, mesh: Any = None,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> Callable:
    """``step(state, frozen, batch) -> (state, metrics)``; jit it with shardings (``jsr.train.loop``).

    ``mesh`` (a ``Mesh`` or ``AbstractMesh``; ``None``: one device): the step traces with it in context and
    constrains the models' activations by ``rules`` (``config.mesh.rules``; :func:`jsr.train.sharding.tracing`).

    ``metrics`` holds every update's named loss parts (prefixed by the group), ``<group>/loss``,
    ``<group>/grad_norm``, ``<group>/skipped`` (1.0 when a non-finite update was dropped) and
    ``nonfinite_steps`` (consecutive steps with a dropped update, including this one).
    """

    def step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        with sharding.tracing(mesh, rules):
            return body(state, frozen, batch)

    def body(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array]):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        batch = {**batch, "step": state.step}
        params, opt_state = dict(state.params), dict(state.opt_state)
        metrics: dict[str, jax.Array] = {}
        carry = None
        any_bad = jnp.asarray(False)
        for i, u in enumerate(updates):
            u_rng = jax.random.fold_in(step_rng, i)
            loss, parts, carry, grads = _grads(u, params, frozen, batch, u_rng, carry, accum_steps)
            ok = jnp.isfinite(loss) & _all_finite(grads)
            upd, new_opt = u.optimizer.update(grads, opt_state[u.group], params[u.group])
            new_params = optax.apply_updates(params[u.group], upd)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            params[u.group] = keep(new_params, params[u.group])
            opt_state[u.group] = keep(new_opt, opt_state[u.group])
            any_bad = any_bad | ~ok
            metrics.update({f"{u.group}/{k}": v.astype(jnp.float32) for k, v in parts.items()})
            metrics[f"{u.group}/loss"] = loss.astype(jnp.float32)
            metrics[f"{u.group}/grad_norm"] = optax.global_norm(grads).astype(jnp.float32)
            metrics[f"{u.group}/skipped"] = (~ok).astype(jnp.float32)
        new_state = TrainState(step=state.step + 1, rng=jax.random.key_data(rng), params=params,
                               opt_state=opt_state,
                               nonfinite=jnp.where(any_bad, state.nonfinite + 1, 0).astype(jnp.int32))
        metrics["nonfinite_steps"] = new_state.nonfinite.astype(jnp.float32)
        return new_state, metrics

    return step
