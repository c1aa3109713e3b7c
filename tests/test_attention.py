"""The attention dispatch: every implementation equals the reference math; errors are explicit. The splash kernel
itself is tested in test_attention_splash.py."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import attention


def _reference(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(np.broadcast_to(mask, s.shape), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 300, 3, 16))
    k = jax.random.normal(ks[1], (2, 200, 3, 16))
    v = jax.random.normal(ks[2], (2, 200, 3, 16))
    return q, k, v


# f32 softmax attention against a float64 NumPy reference: errors are float32 round-off (~1e-6).
@pytest.mark.parametrize("impl", ["xla", "jax", "chunked"])
def test_implementations_match_reference(qkv, impl):
    q, k, v = qkv
    out = attention.dot_product_attention(q, k, v, impl=impl, chunk_size=64)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "jax", "chunked"])
def test_causal_mask(qkv, impl):
    q, k, v = qkv
    mask = jnp.tril(jnp.ones((300, 200), bool))
    out = attention.dot_product_attention(q, k, v, mask=mask, impl=impl, chunk_size=128)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, np.asarray(mask)), atol=2e-5)


def test_chunked_gradient_matches_reference(qkv):
    q, k, v = qkv
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, impl=impl,
                                                                                        chunk_size=128)))
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_chunked_handles_ragged_last_chunk_and_jit(qkv):
    q, k, v = qkv
    f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl="chunked", chunk_size=128))
    np.testing.assert_allclose(np.asarray(f(q, k, v)), _reference(q, k, v), atol=2e-5)


def test_long_key_sequences_take_the_key_blocked_path(qkv, monkeypatch):
    """Over KEY_BLOCKED_FROM keys an unmasked chunked call runs the running-softmax recurrence over key blocks
    (the staged VAE's whole-image attention on large images); shrunk here so that 200 keys make 4 blocks, the
    last one ragged (masked padding), and 300 queries 3 ragged query blocks. Values and gradients against the
    float64 reference / the plain path, within float32 round-off."""
    q, k, v = qkv
    monkeypatch.setattr(attention, "KEY_BLOCKED_FROM", 100)
    monkeypatch.setattr(attention, "KEY_BLOCK", 64)
    monkeypatch.setattr(attention, "KEY_BLOCKED_QUERIES", 128)
    f = lambda q, k, v: attention.dot_product_attention(q, k, v, impl="chunked")  # noqa: E731
    assert "scan" in str(jax.make_jaxpr(f)(q, k, v))  # the key-blocked path ran (the query-blocked one has none)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k, v)), _reference(q, k, v), atol=2e-5)
    loss = lambda g: lambda q, k, v: jnp.sum(jnp.sin(g(q, k, v)))  # noqa: E731
    got = jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: attention.dot_product_attention(q, k, v, impl="xla")), argnums=(0, 1, 2))(
        q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # Masked calls keep the query-blocked path (the recurrence takes no mask).
    mask = jnp.tril(jnp.ones((300, 200), bool))
    out = attention.dot_product_attention(q, k, v, mask=mask, impl="chunked")
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, np.asarray(mask)), atol=2e-5)


def test_auto_choices():
    r = attention.resolve_implementation
    assert r("auto", (1, 4096, 5, 64), (1, 77, 5, 64), jnp.float32) == "xla"  # cross-attention stays plain
    assert r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.float32) == "chunked"  # on CPU: fastest form
    assert r("auto", (4, 16384, 5, 64), (4, 16384, 5, 64), jnp.float32) == "chunked"  # 20 GB of scores
    assert r("chunked", (1, 8, 1, 8), (1, 8, 1, 8), jnp.float32) == "chunked"


def test_auto_on_gpu_takes_cudnn_only_for_head_dims_it_supports(monkeypatch):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    r = attention.resolve_implementation
    assert r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.bfloat16) == "cudnn"  # UNet self-attention
    assert r("auto", (1, 4096, 1, 512), (1, 4096, 1, 512), jnp.bfloat16) == "xla"  # VAE mid-block: d = 512
    assert r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.float32) == "xla"  # cuDNN flash is bf16/f16 only


def test_auto_on_tpu_takes_splash_for_long_unmasked_attention(monkeypatch):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    r = attention.resolve_implementation
    # Several devices (the 8 test CPUs) and no mesh set: the program might span them, and XLA cannot partition
    # a Pallas kernel, so auto stays on XLA; with the mesh set, splash runs per shard.
    assert jax.device_count() > 1 and r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.bfloat16) == "xla"
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.sharding.use_abstract_mesh(mesh):
        assert r("auto", (8, 4096, 5, 64), (8, 4096, 5, 64), jnp.bfloat16) == "splash"
    monkeypatch.setattr(attention.jax, "device_count", lambda: 1)
    assert r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.bfloat16) == "splash"  # UNet self-attention
    assert r("auto:block_q=256", (1, 1024, 5, 64), (1, 1024, 5, 64), jnp.float32) == "splash"
    assert r("auto", (1, 4096, 5, 64), (1, 77, 5, 64), jnp.bfloat16) == "xla"  # text cross-attention: short
    assert r("auto", (1, 4096, 1, 512), (1, 4096, 1, 512), jnp.bfloat16) == "xla"  # VAE mid-block: d = 512
    assert r("auto", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.bfloat16, masked=True) == "xla"  # splash: no mask
    assert r("splash", (1, 4096, 5, 64), (1, 4096, 5, 64), jnp.bfloat16, masked=True) == "xla"
    assert r("splash", (1, 64, 5, 64), (1, 77, 5, 64), jnp.bfloat16) == "splash"  # explicit: taken as asked


def test_masked_splash_call_runs_the_masked_fallback_and_logs_it_once(qkv, caplog):
    q, k, v = qkv
    mask = jnp.tril(jnp.ones((300, 200), bool))
    attention._LOGGED.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            out = attention.dot_product_attention(q, k, v, mask=mask, impl="splash")
            np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, np.asarray(mask)), atol=2e-5)
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("attention:")]
    assert lines == ["attention: 'splash' runs 'xla' on cpu (a masked call: splash takes no mask)"]


def test_unknown_implementations_and_options_fail_clearly(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="unknown"):
        attention.dot_product_attention(q, k, v, impl="flash9")
    with pytest.raises(ValueError, match="takes no options"):
        attention.dot_product_attention(q, k, v, impl="xla:block_q=128")
    with pytest.raises(ValueError, match="NAME=VALUE"):  # checked on every backend, not first on a TPU
        attention.dot_product_attention(q, k, v, impl="auto:blok_q=128")
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        attention.dot_product_attention(q[0], k, v)
