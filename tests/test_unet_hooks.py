"""The UNet's extension points against diffusers' PyTorch UNet2DConditionModel with the same random weights.

* ``conv_in_modulation``: the reference is diffusers with a forward hook on ``conv_in`` applying the same
  ``h * (1 + scale) + shift``.
* a context of any token count (257 visual-prompt-like tokens) as ``encoder_hidden_states``.
* ``capture_attention``: the reference maps come from an attention processor of our own set on diffusers' attn2
  modules, recording ``softmax(q k^T * scale)`` averaged over heads.

One tiny SD-2-style model (two levels, attention in the first down block, the mid block and the last up block:
four attn2 layers). Tolerances: outputs < 1e-4 relative L2 in float32 as in tests/test_unet.py (different
summation orders over ~20 layers; measured ~1e-6); attention maps < 1e-5 (a handful of layers before each map,
softmax of O(1) scores; measured 3e-7 to 6e-7).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models.unet import attention_maps, cross_attention_layers
from jsr.weights.unet import load_unet, save_unet
from jsr.weights import io
from tests.helpers import rel_error, randomise_torch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=48, norm_num_groups=8,
    use_linear_projection=True,
)
ATTN2 = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",
         "mid_block.attentions.0.transformer_blocks.0.attn2",
         "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
         "up_blocks.1.attentions.1.transformer_blocks.0.attn2")
T = np.array([999.0, 250.5], np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hooks_unet")
    model = randomise_torch(diffusers.UNet2DConditionModel(**CONFIG).eval(), seed=5)
    model.save_pretrained(folder)
    module, params = load_unet(folder)
    return model, module, params, folder


def _inputs(batch=2, size=(16, 16), ctx_len=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *size, CONFIG["in_channels"])).astype(np.float32)
    ctx = rng.normal(size=(batch, ctx_len, CONFIG["cross_attention_dim"])).astype(np.float32)
    return x, ctx


def _torch_forward(model, x, t, ctx):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    torch.from_numpy(ctx)).sample
    return out.numpy().transpose(0, 2, 3, 1)


# capture_attention and mutable are static (Python values shaping the computation), as documented. Tests share
# input shapes where they can so that one compiled program serves several (each costs ~10 s on 2 cores).
_apply = jax.jit(lambda module, *a, **k: module.apply(*a, **k), static_argnums=0,
                 static_argnames=("capture_attention", "mutable"))
MAPS = ("attention_maps",)


def _jaxpr(module, *args, **kwargs) -> str:
    return str(jax.make_jaxpr(lambda *a: module.apply(*a, **kwargs))(*args))


def _captured_shapes(module, *args, capture_attention):
    """Name -> shape of the maps a capture would sow, by tracing only (no compilation)."""
    _, state = jax.eval_shape(lambda *a: module.apply(*a, capture_attention=capture_attention, mutable=MAPS), *args)
    return {name: s.shape for name, s in attention_maps(state).items()}


def test_modulation_none_and_zero_are_the_plain_unet(tiny):
    _, module, params, _ = tiny
    x, ctx = _inputs()
    v = {"params": params}
    # None is the very same computation as before the hook existed: an identical program.
    assert _jaxpr(module, v, x, T, ctx, conv_in_modulation=None) == _jaxpr(module, v, x, T, ctx)
    plain = np.asarray(_apply(module, v, x, T, ctx))
    # h * (1 + 0) + 0 is exactly h in float arithmetic, so zero modulation is bit-identical too.
    c0 = CONFIG["block_out_channels"][0]
    zeros = (jnp.zeros((2, 16, 16, c0)), jnp.zeros((2, 1, 1, c0)))
    np.testing.assert_array_equal(_apply(module, v, x, T, ctx, conv_in_modulation=zeros), plain)


def test_modulation_matches_diffusers_conv_in_hook(tiny):
    model, module, params, _ = tiny
    x, ctx = _inputs(seed=1)
    rng = np.random.default_rng(2)
    c0 = CONFIG["block_out_channels"][0]
    scale = (0.3 * rng.normal(size=(2, 16, 16, c0))).astype(np.float32)  # a spatial map (SFT)
    shift = (0.3 * rng.normal(size=(2, 1, 1, c0))).astype(np.float32)  # a per-channel vector, broadcast
    y = _apply(module, {"params": params}, x, T, ctx, conv_in_modulation=(scale, shift))

    s_t = torch.from_numpy(scale.transpose(0, 3, 1, 2).copy())
    b_t = torch.from_numpy(shift.transpose(0, 3, 1, 2).copy())
    hook = model.conv_in.register_forward_hook(lambda mod, inp, out: out * (1 + s_t) + b_t)
    try:
        ref = _torch_forward(model, x, T, ctx)
    finally:
        hook.remove()
    assert rel_error(y, ref) < 1e-4
    assert rel_error(y, _torch_forward(model, x, T, ctx)) > 1e-2  # the modulation changed the output

    with pytest.raises(ValueError, match="does not broadcast to conv_in's output"):
        _apply(module, {"params": params}, x, T, ctx, conv_in_modulation=(scale[..., :3], shift))


def test_long_context_matches_diffusers(tiny):
    """A 257-token context (e.g. CLIP-vision tokens projected to cross_attention_dim) in place of the text."""
    model, module, params, _ = tiny
    x, ctx = _inputs(ctx_len=257, seed=3)
    y = _apply(module, {"params": params}, x, T, ctx)
    assert y.shape == x.shape
    assert rel_error(y, _torch_forward(model, x, T, ctx)) < 1e-4
    # The extra tokens are attended to, not cut: the first 7 tokens alone (the other tests' context length, so
    # no new compilation) give another output.
    assert rel_error(_apply(module, {"params": params}, x, T, ctx[:, :7]), y) > 1e-2


class _MapRecorder:
    """A diffusers attention processor (our own) computing attention explicitly and recording softmax(q k^T *
    scale) averaged over heads, [B, Lq, Lk], in ``store[name]``."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, lq, _ = hidden_states.shape
        split = lambda t: t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)  # [B, H, L, D]
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * attn.scale, dim=-1)
        self.store[self.name] = probs.mean(dim=1).numpy()
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, lq, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_captured_maps_match_diffusers(tiny):
    model, module, params, _ = tiny
    x, ctx = _inputs(seed=4)
    assert cross_attention_layers(module.config) == ATTN2

    store, saved = {}, {}
    for name, m in model.named_modules():
        if name.endswith("attn2"):
            saved[name] = m.processor
            m.set_processor(_MapRecorder(name, store))
    try:
        ref_out = _torch_forward(model, x, T, ctx)
    finally:
        for name, proc in saved.items():
            model.get_submodule(name).set_processor(proc)
    assert sorted(store) == sorted(ATTN2)

    y, state = _apply(module, {"params": params}, x, T, ctx, capture_attention=("",), mutable=MAPS)
    maps = attention_maps(state)
    assert sorted(maps) == sorted(ATTN2)
    assert rel_error(y, ref_out) < 1e-4
    lq = {"down_blocks.0": 256, "mid_block": 64, "up_blocks.1": 256}  # 16x16 and 8x8 feature maps
    for name, ref in store.items():
        got = maps[name]
        assert got.dtype == jnp.float32 and got.shape == (2, lq[name.split(".attentions")[0]], 7) == ref.shape
        assert rel_error(got, ref) < 1e-5, name
        np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=1e-5)


def test_capture_selection(tiny):
    """Which layers a pattern selects, and the map shapes, by tracing only."""
    _, module, params, _ = tiny
    x, ctx = _inputs(size=(18, 18), ctx_len=257)
    args = ({"params": params}, x, T, ctx)
    assert _captured_shapes(module, *args, capture_attention=("",)) == {
        ATTN2[0]: (2, 324, 257), ATTN2[1]: (2, 81, 257), ATTN2[2]: (2, 324, 257), ATTN2[3]: (2, 324, 257)}
    assert sorted(_captured_shapes(module, *args, capture_attention=("up_blocks.1.attentions",))) == list(ATTN2[2:])
    assert sorted(_captured_shapes(module, *args, capture_attention=("mid_block", "up_blocks.1.attentions.1"))) == \
        [ATTN2[1], ATTN2[3]]
    assert list(_captured_shapes(module, *args, capture_attention="mid_block")) == [ATTN2[1]]  # a bare string
    assert _captured_shapes(module, *args, capture_attention=()) == {}
    # Capturing without a mutable collection stores nothing and returns the bare output.
    out = jax.eval_shape(lambda *a: module.apply(*a, capture_attention=("",)), *args)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="'up_block.1' selects no cross-attention layer"):
        _captured_shapes(module, *args, capture_attention=("up_block.1",))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_attention_with_probs_equals_dispatch(impl):
    """The capture path's attention output equals the dispatch it replaces (float32 round-off, < 1e-6), and its
    probabilities are softmax(q k^T / sqrt(d)) (float64 NumPy reference, < 1e-6)."""
    from jsr.models.attention import attention_with_probs, dot_product_attention

    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 16)), jnp.float32) for n in (324, 257, 257))
    out, probs = jax.jit(attention_with_probs)(q, k, v)
    assert probs.shape == (2, 3, 324, 257) and probs.dtype == jnp.float32
    ref = jax.jit(lambda *a: dot_product_attention(*a, impl=impl))(q, k, v)
    assert rel_error(out, ref) < 1e-6
    s = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    assert rel_error(probs, p / p.sum(-1, keepdims=True)) < 1e-6


def test_attention_maps_helper_forms():
    """The helper takes the apply state or the collection; a layer sown twice (a UNet called twice in one
    apply) gives its maps stacked in call order."""
    a, b = jnp.zeros((1, 4, 3)), jnp.ones((1, 4, 3))
    layer = {"up_blocks_1": {"attentions_0": {"transformer_blocks_0": {"attn2": {"probs": (a, b)}}}}}
    mid = {"mid_block": {"attentions_0": {"transformer_blocks_0": {"attn2": {"probs": (a,)}}}}}
    collection = {**layer, **mid}
    for given in (collection, {"attention_maps": collection}):
        maps = attention_maps(given)
        assert sorted(maps) == [ATTN2[1], ATTN2[2]]
        assert maps[ATTN2[1]].shape == (1, 4, 3)
        np.testing.assert_array_equal(maps[ATTN2[2]], np.stack([a, b]))


def test_capture_none_is_the_fast_path_and_capture_keeps_the_output(tiny):
    _, module, params, _ = tiny
    # 18x18 latents (324 queries) and 257 tokens: without capture the CPU dispatch takes the chunked path, so the
    # explicit-probability path is compared with a different summation order. Per layer that is ~1e-7
    # (test_attention_with_probs_equals_dispatch); through the rest of the UNet it measured 8e-7: 5e-6 asked.
    x, ctx = _inputs(size=(18, 18), ctx_len=257, seed=5)
    v = {"params": params}
    # No capture: nothing sown, and the same program as a call without the argument.
    assert _jaxpr(module, v, x, T, ctx, capture_attention=None, mutable=MAPS) == _jaxpr(module, v, x, T, ctx)
    _, state = jax.eval_shape(lambda *a: module.apply(*a, capture_attention=None, mutable=MAPS), v, x, T, ctx)
    assert not state.get("attention_maps")

    plain = _apply(module, v, x, T, ctx)
    y, state = _apply(module, v, x, T, ctx, capture_attention=("",), mutable=MAPS)
    assert rel_error(y, plain) < 5e-6
    assert sorted(attention_maps(state)) == sorted(ATTN2)


def test_capture_under_remat_and_in_a_wrapper(tiny):
    """Maps are sown through nn.remat blocks, and are named relative to the UNet when it is a submodule."""
    import flax.linen as nn

    _, module, params, _ = tiny
    x, ctx = _inputs(seed=6)
    v = {"params": params}
    _, ref = _apply(module, v, x, T, ctx, capture_attention=("",), mutable=MAPS)
    ref = attention_maps(ref)
    _, state = _apply(module.clone(remat=True), v, x, T, ctx, capture_attention=("",), mutable=MAPS)
    got = attention_maps(state)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-6  # same operations; remat may only refuse XLA's fusions

    class Wrapper(nn.Module):
        unet: nn.Module

        @nn.compact
        def __call__(self, *args, **kwargs):
            return self.unet(*args, **kwargs)

    wrapped = Wrapper(module.clone(parent=None))
    _, state = jax.eval_shape(lambda *a: wrapped.apply(*a, capture_attention=("mid_block",), mutable=MAPS),
                              {"params": {"unet": params}}, x, T, ctx)
    assert list(state["attention_maps"]) == ["unet"]
    assert {k: s.shape for k, s in attention_maps(state["attention_maps"]["unet"]).items()} == \
        {ATTN2[1]: (2, 64, 7)}


def test_parameter_tree_and_roundtrip_unchanged(tiny, tmp_path):
    """The hooks add no parameter: save -> load is bit-identical and keys match the diffusers checkpoint."""
    model, module, params, folder = tiny
    save_unet(module, params, tmp_path)
    original, saved = io.read_state_dict(folder), io.read_state_dict(tmp_path)
    assert sorted(saved) == sorted(original) == sorted(model.state_dict())
    for key in original:
        np.testing.assert_array_equal(np.asarray(saved[key]), np.asarray(original[key]))
    _, again = load_unet(tmp_path)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
