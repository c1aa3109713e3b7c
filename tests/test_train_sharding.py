"""Mesh construction and logical-axis sharding on 8 fake CPU devices (set in conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jsr.models import common
from jsr.train import sharding


def test_make_mesh_sizes_and_errors():
    assert jax.device_count() == 8
    m = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh(data=3, fsdp=4)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_replicates_indivisible_dims_and_uses_axes_once():
    m = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    assert sharding.logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 4, 320), m) == P(None, None, None, "fsdp")
    assert sharding.logical_to_spec(("embed", "heads"), (320, 320), m) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 320), m) == P(None, "tensor")  # 6 % 4 != 0
    assert sharding.logical_to_spec(("embed", "embed"), (8, 8), m) == P("fsdp", None)
    assert sharding.logical_to_spec(("norm",), (320,), m) == P(None)
    assert sharding.logical_to_spec(None, (5,), m) == P()


def test_sharded_params_give_the_same_output():
    from tests.test_layers import _Tiny

    model = _Tiny()
    params = common.init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.tree_shardings(params, common.logical_axes(model), mesh)
    assert shardings["to_out_0"]["kernel"].spec == P("fsdp", "tensor")
    sharded = jax.device_put(params, shardings)
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 3))
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    f = jax.jit(lambda p, x: model.apply({"params": p}, x))
    np.testing.assert_allclose(np.asarray(f(sharded, xs)), np.asarray(f(params, x)), rtol=1e-5, atol=1e-6)
    assert len(sharded["to_out_0"]["kernel"].addressable_shards) == 8


@pytest.mark.xfail(strict=True, reason="XLA SPMD miscompile (jax 0.10.2, XLA:CPU): two chained Dense layers both "
                   "sharded (fsdp, tensor) with a LoRA on the first get wrong gradients on a 2x2x2 mesh")
def test_xla_spmd_miscompile_is_still_present():
    # Why Transformer2DModel names proj_in's output "embed" rather than "mlp" (jsr/models/unet_blocks.py). Strict
    # xfail: when a jax upgrade fixes the compiler this test fails, and the workaround's comment can be updated.
    from jax.sharding import NamedSharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (8, 16, 64))
    w1, w2 = jax.random.normal(k[1], (64, 64)), jax.random.normal(k[2], (64, 64))
    a, b = jax.random.normal(k[3], (64, 4)), jax.random.normal(k[4], (4, 64))

    def loss(a, b, w1, w2, x):
        return jnp.sum(jnp.square((x @ w1 + (x @ a) @ b) @ w2 - 0.3))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref = grad(a, b, w1, w2, x)
    put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))
    out = grad(a, b, put(w1, "fsdp", "tensor"), put(w2, "fsdp", "tensor"), put(x, ("data", "fsdp")))
    for o, r in zip(out, ref):  # f32 round-off only, were the compiler right (measured 2e-7 on other meshes)
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


def test_rules_from_the_config():
    """config.mesh.rules: the defaults are DEFAULT_RULES; a string override (as --config.mesh.rules=... gives)
    parses; a rule naming an unknown mesh axis is refused by name; changed rules change the specs."""
    from configs import base as cb

    assert sharding.parse_rules(cb.get_config("osediff").mesh.rules) == sharding.DEFAULT_RULES
    rules = sharding.parse_rules("(('batch', 'fsdp'), ('embed', None), ('mlp', ('tensor', 'fsdp')))")
    assert rules == (("batch", "fsdp"), ("embed", None), ("mlp", ("tensor", "fsdp")))
    with pytest.raises(ValueError, match="rule 'embed' maps to 'model'"):
        sharding.parse_rules((("embed", "model"),))
    with pytest.raises(ValueError, match="not a Python literal"):
        sharding.parse_rules("((")
    mesh = sharding.make_mesh(data=2, fsdp=4)
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh, rules) == P(None, "fsdp")
