"""Activation sharding: logical constraints at block boundaries and on attention heads, resolved from
``config.mesh.rules`` only while a train step for a mesh traces (``jsr.train.sharding.tracing``); the mesh in
context during the loop's trace, so the attention dispatch sees it. 8 fake CPU devices (conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jsr.methods.api import Update
from jsr.models import attention, common, constraints
from jsr.train import loop, sharding
from tests.helpers import rel_error
from tests.test_remat import UNET, VAE, _models

U = P.UNCONSTRAINED


def test_activation_specs_follow_the_rules():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    image = (constraints.BATCH, None, None, constraints.EMBED)
    heads = (constraints.BATCH, None, constraints.HEADS, None)
    spec = lambda names, shape, rules=sharding.DEFAULT_RULES: sharding.activation_spec(names, shape, mesh, rules)  # noqa: E731
    assert spec(image, (8, 16, 16, 32)) == P(("data", "fsdp"), None, None, None)  # channels whole by default
    assert spec(heads, (8, 256, 4, 64)) == P(("data", "fsdp"), None, "tensor", None)
    # What the mesh does not divide is left to XLA, never forced whole: a batch of 2 over 4 batch shards, the
    # VAE's single 512-wide head.
    assert spec(image, (2, 16, 16, 32)) == P(U, None, None, None)
    assert spec(heads, (8, 64, 1, 512)) == P(("data", "fsdp"), None, U, None)
    # The rules table decides: channels over tensor when mapped, and names a custom table leaves out are free.
    rules = sharding.parse_rules(str(sharding.DEFAULT_RULES).replace("('activation_embed', None)",
                                                                     "('activation_embed', 'tensor')"))
    assert spec(image, (8, 16, 16, 32), rules) == P(("data", "fsdp"), None, None, "tensor")
    assert spec(image, (8, 16, 16, 32), (("embed", "fsdp"),)) == P(U, None, None, U)
    # Parameters keep their old rule: unknown or indivisible dims replicate.
    assert sharding.logical_to_spec(("embed", "nothing"), (5, 4), mesh) == P(None, None)


def _unet_jaxpr(module, params, mesh=None) -> str:
    x, ctx = jnp.zeros((8, 4, 4, 4)), jnp.zeros((8, 3, 8))

    def f(p):
        with sharding.tracing(mesh):
            return module.apply({"params": p}, x, 1.0, ctx)

    return str(jax.make_jaxpr(f)(params))


def test_constraints_only_under_a_mesh():
    """No constraint without a mesh (inference, evaluation) or on one device; under a 2x2x2 mesh every block
    boundary and attention input/output is constrained."""
    unet, _ = _models()
    params = common.abstract_params(unet)
    assert "sharding_constraint" not in _unet_jaxpr(unet, params)
    assert "sharding_constraint" not in _unet_jaxpr(unet, params, sharding.make_mesh(data=1, devices=jax.devices()[:1]))
    text = _unet_jaxpr(unet, params, sharding.make_mesh(data=2, fsdp=2, tensor=2))
    # conv_in, the down block's output and its skip, mid, up; 4 transformers (down, mid, 2 up) x 2 attentions x
    # (q, k, v, out).
    assert text.count("sharding_constraint") == 1 + 2 + 1 + 1 + 4 * 2 * 4
    assert "P(('data', 'fsdp'), None, 'tensor', None)" in text


# The default run's 2x2x2 check (46 s on the loaded 2-core CPU); the loop's whole sharded step against the plain
# one (373 s) is tests/test_train_loop.py's, under -m slow.
def test_sharded_remat_gradient_equals_one_device():
    """VAE encoder -> UNet gradient with remat ``blocks`` and activation constraints on a data x fsdp x tensor
    mesh (parameters sharded by their logical axes, the batch over data x fsdp) equals the plain one-device
    gradient: f32 round-off only (other reduction orders)."""
    unet, vae = _models()
    rng = np.random.default_rng(1)
    rand = lambda m: jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32),  # noqa: E731
                                  common.abstract_params(m))
    params = (rand(unet), rand(vae))
    x = jnp.asarray(rng.uniform(-1, 1, size=(8, 16, 16, 3)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(8, 3, UNET["cross_attention_dim"])), jnp.float32)

    def grad_fn(mode, mesh):
        u, v = unet.clone(remat=mode), vae.clone(remat=mode)

        def loss(p, x, ctx):
            with sharding.tracing(mesh):
                z, _ = v.apply({"params": p[1]}, x, method="encode")
                return jnp.mean(jnp.square(z - u.apply({"params": p[0]}, z, jnp.full((8,), 321.5), ctx)))

        return jax.grad(loss)

    ref = jax.jit(grad_fn("none", None))(params, x, ctx)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = tuple(sharding.tree_shardings(p, common.logical_axes(m), mesh) for p, m in zip(params, (unet, vae)))
    assert any("tensor" in s.spec for s in jax.tree.leaves(p_sh))
    b_sh = sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 3)
    fn = jax.jit(grad_fn("blocks", mesh), in_shardings=(p_sh, *b_sh), compiler_options={
        "xla_disable_hlo_passes": "cse_barrier_expander"})
    out = fn(jax.device_put(params, p_sh), *jax.device_put((x, ctx), b_sh))
    flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])  # noqa: E731
    assert rel_error(flat(out), flat(ref)) < 1e-5


def test_the_loop_traces_its_step_under_the_mesh(monkeypatch):
    """The loop's jitted step (``loop.jit_step``) traces with its mesh in context: the attention dispatch, asked
    as on a multi-chip TPU, picks splash (per shard); the same step made without the mesh stays on XLA."""
    seen = []

    def loss(params, frozen, batch, rng, carry):
        q = (8, 1024, 4, 64)
        seen.append(attention.resolve_implementation("auto", q, q, jnp.bfloat16))
        return jnp.sum(jnp.square(params["g"]["w"] - batch["hq"].mean())), ({}, None)

    updates = [Update("g", loss, optax.sgd(0.1))]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rep = sharding.replicated(mesh)
    from configs import fidelity
    from jsr.train.step import init_state, make_train_step

    config = fidelity.get_config("tiny")
    state = init_state({"g": {"w": jnp.ones((4,))}}, updates, 0)
    state_sh = jax.tree.map(lambda _: rep, state)
    batch = {"hq": jnp.ones((8, 2, 2, 3))}
    batch_sh = {"hq": sharding.batch_sharding(mesh)}
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    loop.jit_step(updates, config, mesh, sharding.DEFAULT_RULES, (state_sh, rep, batch_sh), (state_sh, rep)).trace(
        state, {}, batch)
    jax.jit(make_train_step(updates)).trace(state, {}, batch)
    assert seen == ["splash", "xla"]
