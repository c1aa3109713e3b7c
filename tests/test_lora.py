"""jsr.models.lora on a small diffusers-named module (no PyTorch needed): target selection, init, hook == merge,
exact stacking, several LoRAs over one base in one jit, gradients, overrides, logical axes and sharding.

Tolerances: the LoRA branch ``(x A) B`` and the merged kernel ``x (W + A B)`` differ only by f32 summation order:
relative L2 error < 1e-5 (matmul precision is "highest" in tests/conftest.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jsr.models import common, lora as L
from jsr.models.layers import Conv, Dense, GroupNorm
from tests.helpers import rel_error as _rel


class Res(nn.Module):
    ch: int

    @nn.compact
    def __call__(self, x):
        h = Conv(self.ch, name="conv1")(jax.nn.silu(GroupNorm(2, name="norm1")(x)))
        h = Conv(self.ch, name="conv2")(h)
        if x.shape[-1] != self.ch:
            x = Conv(self.ch, kernel_size=(1, 1), padding="VALID", name="conv_shortcut")(x)
        return x + h


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        q, k, v = (Dense(c, use_bias=False, name=n)(x) for n in ("to_q", "to_k", "to_v"))
        w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c))
        return Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", w, v))


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = Dense(c, name="proj_in")(GroupNorm(2, name="norm")(x).reshape(b, hh * ww, c))

        class Block(nn.Module):
            @nn.compact
            def __call__(self, h):
                h = h + Attn(name="attn1")(h)

                class FF(nn.Module):
                    @nn.compact
                    def __call__(self, h):
                        class Net0(nn.Module):
                            @nn.compact
                            def __call__(self, h):
                                return jax.nn.gelu(Dense(2 * c, name="proj")(h))
                        return Dense(c, name="net_2")(Net0(name="net_0")(h))
                return h + FF(name="ff")(h)
        h = Block(name="transformer_blocks_0")(h)
        return x + Dense(c, name="proj_out")(h).reshape(b, hh, ww, c)


class Down(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Res(8, name="resnets_0")(x)
        x = Transformer(name="attentions_0")(x)

        class Downsample(nn.Module):
            @nn.compact
            def __call__(self, x):
                return Conv(8, strides=(2, 2), name="conv")(x)
        return Downsample(name="downsamplers_0")(x)


class Toy(nn.Module):
    """conv_in -> down block (resnet with shortcut, transformer, strided conv) -> mid resnet -> up resnet ->
    norm -> conv_out, plus a time MLP (``time_embedding.linear_1``: not a target)."""

    @nn.compact
    def __call__(self, x, t):
        class TimeEmb(nn.Module):
            @nn.compact
            def __call__(self, t):
                return Dense(4, name="linear_1")(t)
        x = Conv(4, name="conv_in")(x) + TimeEmb(name="time_embedding")(t)[:, None, None, :]
        x = Down(name="down_blocks_0")(x)

        class Mid(nn.Module):
            @nn.compact
            def __call__(self, x):
                return Res(8, name="resnets_0")(x)
        x = Mid(name="mid_block")(x)

        class Up(nn.Module):
            @nn.compact
            def __call__(self, x):
                return Res(6, name="resnets_0")(x)
        x = Up(name="up_blocks_0")(x)
        return Conv(3, name="conv_out")(jax.nn.silu(GroupNorm(2, name="conv_norm_out")(x)))

    def example_inputs(self, batch: int = 1):
        return jnp.zeros((batch, 8, 8, 3)), jnp.zeros((batch, 4))


_JIT = {}


def _run(m, variables, x, t):
    # Eager flax apply dispatches hundreds of tiny ops; one compiled call per tree structure is faster here.
    if id(m) not in _JIT:
        _JIT[id(m)] = jax.jit(m.apply)
    return _JIT[id(m)](variables, x, t)


@pytest.fixture(scope="module")
def toy():
    m = Toy()
    params = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), *m.example_inputs())["params"])
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t = jax.random.normal(jax.random.key(2), (2, 4))
    return m, params, x, t


def _randomize(lora: L.LoRA, seed: int, std: float = 0.1) -> L.LoRA:
    """Non-zero B (and fresh A) so the LoRA actually changes the output (numpy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return lora.replace(factors=jax.tree_util.tree_map(
        lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32), lora.factors))


def test_select_follows_osediff_rules(toy):
    _, params, _, _ = toy
    got = {g: [L.module_name(p) for p in paths] for g, paths in L.select(params, L.OSEDIFF_UNET_TARGETS).items()}
    enc = ["conv_in"] + [f"down_blocks.0.{n}" for n in (
        "attentions.0.proj_in", "attentions.0.proj_out", "attentions.0.transformer_blocks.0.attn1.to_k",
        "attentions.0.transformer_blocks.0.attn1.to_out.0", "attentions.0.transformer_blocks.0.attn1.to_q",
        "attentions.0.transformer_blocks.0.attn1.to_v", "attentions.0.transformer_blocks.0.ff.net.0.proj",
        "attentions.0.transformer_blocks.0.ff.net.2", "downsamplers.0.conv", "resnets.0.conv1", "resnets.0.conv2",
        "resnets.0.conv_shortcut")]
    assert sorted(got["encoder"]) == sorted(enc)
    assert sorted(got["decoder"]) == ["conv_out", "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv2",
                                      "up_blocks.0.resnets.0.conv_shortcut"]
    assert sorted(got["others"]) == ["mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2"]
    flat = [n for v in got.values() for n in v]
    assert not any("norm" in n or "time_embedding" in n for n in flat)
    tr = L.trainable(L.OSEDIFF_UNET, params)
    assert tr["full"] == ["conv_in.bias", "conv_in.weight"]
    assert tr["lora/others"] == ["mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2"]
    assert L.flax_path("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj") == (
        "down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj")
    # The VAE rule: only inside "encoder", plus exactly "quant_conv" (never post_quant_conv).
    t = L.OSEDIFF_VAE_TARGETS
    assert t.group_of("encoder.down_blocks.0.resnets.0.conv1.weight") == "encoder"
    assert t.group_of("quant_conv.weight") == "encoder"
    assert t.group_of("post_quant_conv.weight") is None
    assert t.group_of("decoder.conv_in.weight") is None
    assert t.group_of("encoder.mid_block.attentions.0.group_norm.weight") is None


def test_init_is_peft_gaussian_and_identity(toy):
    m, params, x, t = toy
    lo = L.init(jax.random.key(3), params, L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=4, alpha=8))
    a = np.concatenate([np.ravel(n["a"]) for n in jax.tree_util.tree_leaves(
        L._map_nodes(lo.factors, lambda n: n), is_leaf=lambda n: isinstance(n, dict) and "a" in n)])
    assert abs(a.std() - 0.25) < 0.02  # std 1/rank over ~2k draws
    assert all(float(jnp.abs(b).max()) == 0 for p, b in traverse_util.flatten_dict(lo.factors).items() if p[-1] == "b")
    assert lo.scale == 2.0
    base = _run(m, {"params": params}, x, t)
    assert _rel(_run(m, L.variables(params, lo), x, t), base) < 1e-6  # B = 0: the base (up to XLA fusion)
    # Factor dtype stays float32 whatever the base dtype (bf16 base, f32 masters).
    lo16 = L.init(jax.random.key(3), jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), params),
                  L.OSEDIFF_UNET)
    assert {x.dtype for x in jax.tree_util.tree_leaves(lo16)} == {jnp.dtype(jnp.float32)}
    # Abstract params are enough for the factors (shapes only).
    ab = jax.eval_shape(lambda: L.init(jax.random.key(0), params, L.OSEDIFF_UNET))
    assert jax.tree_util.tree_structure(ab) == jax.tree_util.tree_structure(L.init(jax.random.key(0), params,
                                                                                     L.OSEDIFF_UNET))


def test_overrides_own_their_buffers(toy):
    # The train step donates the LoRA trees; an override sharing the frozen base's buffer (f32 base) would free
    # the base with it ("buffer previously donated" on the next call).
    _, params, _, _ = toy
    lo = L.init(jax.random.key(3), params, L.OSEDIFF_UNET)
    jax.jit(lambda tree: jax.tree_util.tree_map(lambda v: v + 1, tree), donate_argnums=0)(lo)
    assert not params["conv_in"]["kernel"].is_deleted()


def test_hook_equals_merge_and_overrides(toy):
    m, params, x, t = toy
    lo = _randomize(L.init(jax.random.key(3), params, L.OSEDIFF_UNET), 4)
    lo = lo.replace(overrides=jax.tree_util.tree_map(lambda v: v + 0.05, lo.overrides))
    y = _run(m, L.variables(params, lo), x, t)
    merged = L.merge(params, lo)
    assert _rel(y, _run(m, {"params": merged}, x, t)) < 1e-5
    assert _rel(y, _run(m, {"params": params}, x, t)) > 1e-2  # the LoRA does something
    # merge copies: the base is untouched.
    assert not np.allclose(merged["conv_in"]["kernel"], params["conv_in"]["kernel"])
    np.testing.assert_array_equal(L.with_overrides(params, {})["conv_in"]["kernel"], params["conv_in"]["kernel"])


def _scaled(lora: L.LoRA, w: float) -> L.LoRA:
    return lora.replace(factors=L._map_nodes(lora.factors, lambda n: {"a": n["a"], "b": n["b"] * w}))


def test_stack_is_exact(toy):
    m, params, x, t = toy
    l1 = _randomize(L.init(jax.random.key(5), params, L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=4, alpha=8)), 6)
    # A second LoRA of another rank/alpha on a subset of layers (attention only).
    attn = L.Targets(patterns=("to_q", "to_k", "to_v", "to_out.0"))
    l2 = _randomize(L.init(jax.random.key(7), params, L.LoRASpec(attn, rank=2, alpha=1)), 8)
    w1, w2 = 0.7, -1.3
    s = L.stack([(l1, w1), (l2, w2)])
    assert s.rank == 6 and s.scale == 1.0
    assert all(n["a"].shape[-1] == 6 for n in jax.tree_util.tree_leaves(
        s.factors, is_leaf=lambda n: isinstance(n, dict) and "a" in n))
    ref = L.merge(L.merge(params, _scaled(l1, w1)), _scaled(l2, w2))
    assert _rel(_run(m, L.variables(params, s), x, t), _run(m, {"params": ref}, x, t)) < 1e-5
    # Overrides: weight 1 and disjoint -> kept as they are; otherwise a base is required.
    lo = L.init(jax.random.key(3), params, L.OSEDIFF_UNET)
    lo = lo.replace(overrides=jax.tree_util.tree_map(lambda v: v + 1.0, lo.overrides))
    np.testing.assert_allclose(L.stack([(lo, 1.0), (l2, 0.5)]).overrides["conv_in"]["bias"],
                               lo.overrides["conv_in"]["bias"])
    with pytest.raises(ValueError, match="params="):
        L.stack([(lo, 0.5)])
    half = L.stack([(lo, 0.5)], params=params)
    np.testing.assert_allclose(half.overrides["conv_in"]["bias"], params["conv_in"]["bias"] + 0.5, atol=1e-6)


def test_several_loras_one_base_one_jit(toy):
    m, params, x, t = toy
    l1 = _randomize(L.init(jax.random.key(5), params, L.OSEDIFF_UNET), 6)
    l2 = _randomize(L.init(jax.random.key(7), params, L.LoRASpec(L.OSEDIFF_UNET_TARGETS, rank=2, alpha=3)), 8)

    @jax.jit
    def three(base, a, b, x, t):
        return (m.apply(L.variables(base), x, t), m.apply(L.variables(base, a), x, t),
                m.apply(L.variables(base, b), x, t))

    y0, y1, y2 = three(params, l1, l2, x, t)
    assert _rel(y0, _run(m, {"params": params}, x, t)) < 1e-6
    assert _rel(y1, _run(m, {"params": L.merge(params, l1)}, x, t)) < 1e-5
    assert _rel(y2, _run(m, {"params": L.merge(params, l2)}, x, t)) < 1e-5
    assert _rel(y1, y2) > 1e-2


def test_grads_reach_lora_only(toy):
    m, params, x, t = toy
    lo = _randomize(L.init(jax.random.key(5), params, L.OSEDIFF_UNET), 6)

    def loss(lora, base):
        return jnp.mean(_run(m, L.variables(base, lora), x, t) ** 2)

    g = jax.grad(loss)(lo, params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(lo)  # no base leaves in the grads
    for path, v in traverse_util.flatten_dict(g.factors).items():
        assert float(jnp.abs(v).max()) > 0, path
    for path, v in traverse_util.flatten_dict(g.overrides).items():
        assert float(jnp.abs(v).max()) > 0, path
    # At init (B = 0) the gradient still flows into B.
    g0 = jax.grad(loss)(L.init(jax.random.key(5), params, L.OSEDIFF_UNET), params)
    assert float(jnp.abs(g0.factors["conv_out"]["b"]).max()) > 0
    # An optimizer step on the LoRA leaves the base bit-identical (it is a separate, undifferentiated argument).
    before = jax.tree_util.tree_map(np.array, params)
    new = jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, lo, g)
    _ = loss(new, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, params)


def test_check_names_problems(toy):
    _, params, _, _ = toy
    lo = L.init(jax.random.key(5), params, L.OSEDIFF_UNET)
    bad = lo.replace(factors={**lo.factors, "nope": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 3))},
                              "conv_out": {"a": jnp.zeros((3, 3, 5, 4)), "b": jnp.zeros((1, 1, 4, 3))}})
    with pytest.raises(L.LoRAMismatchError) as e:
        L.check(bad, params)
    assert "nope" in str(e.value) and "conv_out" in str(e.value)
    with pytest.raises(L.LoRAMismatchError, match="not found"):
        L.init(jax.random.key(0), params, L.LoRASpec(L.OSEDIFF_UNET_TARGETS, full=("conv_nope",)))


def test_logical_axes_and_sharded_apply(toy):
    m, params, x, t = toy
    from jax.sharding import Mesh, NamedSharding
    lo = _randomize(L.init(jax.random.key(5), params, L.OSEDIFF_UNET), 6)
    axes = L.logical_axes(lo, common.logical_axes(m))
    assert axes.factors["conv_in"]["a"] == jax.sharding.PartitionSpec(None, None, "conv_in", "lora_rank")
    assert axes.factors["conv_in"]["b"] == jax.sharding.PartitionSpec(None, None, "lora_rank", "conv_out")
    assert axes.factors["down_blocks_0"]["attentions_0"]["proj_in"]["a"] == jax.sharding.PartitionSpec(
        "embed", "lora_rank")
    assert axes.overrides["conv_in"]["kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    devices = np.array(jax.devices()[:2]).reshape(1, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    rules = (("conv_out", "fsdp"), ("embed", "fsdp"), ("lora_rank", None), ("conv_in", None), ("mlp", None))
    shardings = nn.logical_to_mesh_sharding(axes, mesh, rules)
    assert isinstance(shardings.factors["conv_in"]["b"], NamedSharding)
    # Uneven dims (3, 6 channels) cannot be split in two: replicate those, shard the rest.
    def put(v, s):
        ok = all(d % mesh.shape[a] == 0 for d, a in zip(v.shape, s.spec) if a is not None)
        return jax.device_put(v, s if ok else NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharded = jax.tree_util.tree_map(put, lo, shardings)
    y = jax.jit(lambda base, l: m.apply(L.variables(base, l), x, t))(params, sharded)
    assert _rel(y, _run(m, L.variables(params, lo), x, t)) < 1e-5
