"""Mesh construction and logical-axis sharding on 8 fake CPU devices (set in conftest)."""
import jax
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
