"""Primitive layers against PyTorch, the LoRA hook against the merged-weight formula, and the generic converter."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models.layers import Conv, Dense, GroupNorm, LayerNorm
from jsr.weights import convert
from tests.helpers import rel_error as _rel

torch = pytest.importorskip("torch")


def _nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("size,im2col", [(9, True), (9, False), (20, False)])
@pytest.mark.parametrize("stride,pad,tpad", [((1, 1), ((1, 1), (1, 1)), 1), ((2, 2), ((1, 1), (1, 1)), 1),
                                             ((2, 2), ((0, 1), (0, 1)), None)])
def test_conv_matches_torch(stride, pad, tpad, size, im2col, monkeypatch):
    from jsr.models import layers

    monkeypatch.setattr(layers, "im2col_pays", lambda pixels, channels: im2col)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 4))
    m = Conv(6, strides=stride, padding=pad)
    p = m.init(jax.random.key(1), x)["params"]
    p = nn.meta.unbox(p)
    y = m.apply({"params": p}, x)
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=tpad or 0)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"])))
        xt = _nchw(x)
        if tpad is None:  # diffusers' VAE downsampler: pad right/bottom by one, then a stride-2 VALID conv
            xt = torch.nn.functional.pad(xt, (0, 1, 0, 1))
        ref = conv(xt).numpy().transpose(0, 2, 3, 1)
    assert _rel(y, ref) < 1e-5  # f32 conv, different summation order


def test_im2col_only_where_it_pays(monkeypatch):
    """Small maps with >= 128 channels, and only while XLA:CPU's YNN convolution fusion is on."""
    from jsr.models import layers

    on = "--xla_force_host_platform_device_count=8"
    off = on + " --xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution,-reduce"
    monkeypatch.setenv("XLA_FLAGS", on)
    assert layers.im2col_pays(64, 1280) and layers.im2col_pays(256, 128)
    assert not layers.im2col_pays(257, 1280) and not layers.im2col_pays(64, 64)
    monkeypatch.setenv("XLA_FLAGS", off)
    assert not layers.im2col_pays(64, 1280)
    monkeypatch.setenv("XLA_FLAGS", off + " --xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    assert layers.im2col_pays(64, 1280)  # the last occurrence of a flag wins, as in XLA


def test_norms_match_torch():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8)) * 3 + 1
    gn = GroupNorm(num_groups=4, epsilon=1e-6)
    p = nn.meta.unbox(gn.init(jax.random.key(1), x)["params"])
    p = {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)}
    ref = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2, 8))
        ref.bias.copy_(torch.linspace(-1, 1, 8))
        r = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    assert _rel(gn.apply({"params": p}, x), r) < 1e-6
    ln = LayerNorm()
    lref = torch.nn.LayerNorm(8)
    with torch.no_grad():
        lref.weight.copy_(torch.linspace(0.5, 2, 8))
        lref.bias.copy_(torch.linspace(-1, 1, 8))
        r = lref(torch.from_numpy(np.asarray(x))).numpy()
    assert _rel(ln.apply({"params": p}, x), r) < 1e-6
    with pytest.raises(ValueError, match="not divisible"):
        GroupNorm(num_groups=3).init(jax.random.key(0), x)


def test_lora_branches_equal_merged_weights():
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (2, 7, 7, 4))
    conv = Conv(5, strides=(2, 2))
    p = nn.meta.unbox(conv.init(ks[1], x)["params"])
    a, b = jax.random.normal(ks[2], (3, 3, 4, 2)), jax.random.normal(ks[3], (1, 1, 2, 5))
    y = conv.apply({"params": p, "lora": {"a": a, "b": b}}, x)
    merged = dict(p, kernel=p["kernel"] + jnp.einsum("hwir,ro->hwio", a, b[0, 0]))
    assert _rel(y, conv.apply({"params": merged}, x)) < 1e-5
    dense = Dense(6)
    xd = x.reshape(2, -1, 4)
    pd = nn.meta.unbox(dense.init(ks[4], xd)["params"])
    ad, bd = jax.random.normal(ks[5], (4, 3)), jax.random.normal(ks[2], (3, 6))
    yd = dense.apply({"params": pd, "lora": {"a": ad, "b": bd}}, xd)
    assert _rel(yd, dense.apply({"params": dict(pd, kernel=pd["kernel"] + ad @ bd)}, xd)) < 1e-5
    assert _rel(yd, dense.apply({"params": pd}, xd)) > 1e-2  # the branch really contributes


def test_bf16_compute_with_f32_params():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    m = Conv(4, dtype=jnp.bfloat16)
    p = nn.meta.unbox(m.init(jax.random.key(1), x)["params"])
    assert p["kernel"].dtype == jnp.float32
    y = m.apply({"params": p}, x)
    assert y.dtype == jnp.bfloat16
    ref = Conv(4).apply({"params": p}, x)
    assert _rel(y.astype(jnp.float32), ref) < 2e-2  # bf16 has an 8-bit mantissa


class _Tiny(nn.Module):
    def example_inputs(self, batch=1):
        return (jnp.zeros((batch, 4, 4, 3)),)

    @nn.compact
    def __call__(self, x):
        x = Conv(4, name="conv_in")(x)
        x = GroupNorm(2, name="norm")(x)
        for i in range(2):
            x = Dense(4, name=f"to_out_{i}")(x)
        return Dense(2, name="linear_1")(x)


def test_converter_names_roundtrip_and_strict_errors():
    m = _Tiny()
    p = common.init_params(m, jax.random.key(0))
    state = convert.params_to_torch_state(p, {"to_out"})
    assert set(state) == {"conv_in.weight", "conv_in.bias", "norm.weight", "norm.bias", "to_out.0.weight",
                          "to_out.0.bias", "to_out.1.weight", "to_out.1.bias", "linear_1.weight", "linear_1.bias"}
    assert state["conv_in.weight"].shape == (4, 3, 3, 3) and state["to_out.0.weight"].shape == (4, 4)
    back = convert.torch_state_to_params(state, common.abstract_params(m), {"to_out"}, model="tiny")
    jax.tree.map(np.testing.assert_array_equal, back, p)
    axes = common.logical_axes(m)
    assert tuple(axes["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")

    bad = dict(state)
    del bad["norm.bias"]
    bad["stray.weight"] = np.zeros(1, np.float32)
    bad["to_out.1.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(convert.CheckpointMismatchError) as e:
        convert.torch_state_to_params(bad, common.abstract_params(m), {"to_out"}, model="tiny")
    msg = str(e.value)
    assert "norm.bias" in msg and "stray.weight" in msg and "to_out.1.weight" in msg and "(5, 4)" in msg
    ignored = convert.torch_state_to_params(dict(state, buf=np.zeros(1)), common.abstract_params(m), {"to_out"},
                                            model="tiny", ignore=[r"^buf$"], dtype=jnp.bfloat16)
    assert ignored["conv_in"]["kernel"].dtype == jnp.bfloat16
