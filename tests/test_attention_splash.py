"""Pallas splash attention (the TPU kernel) run in CPU interpret mode against a float64 NumPy reference: the
forward and the kernel's own backward (its custom VJP: dq, dk, dv), head dims 64 (padded to 128) and 128, lengths
on and off the block grid, cross-attention with 77 text tokens. Interpret mode compiles the kernel as an XLA
scan, so each case is one small jitted forward+backward program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import attention, splash_attention
from jsr.models.splash_config import SplashConfig, config_from_spec, parse_options, plan_blocks


def _reference(q, k, v, do):
    """out = softmax(q k^T / sqrt(d)) v and its gradients w.r.t. q, k, v for the output cotangent do (float64)."""
    q, k, v, do = (np.asarray(a, np.float64) for a in (q, k, v, do))
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return out, (dq, dk, dv)


def _inputs(b, lq, lk, h, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, lq, h, d)), jax.random.normal(ks[1], (b, lk, h, d)),
            jax.random.normal(ks[2], (b, lk, h, d)), jax.random.normal(ks[3], (b, lq, h, d)))


def _forward_and_grads(attend, q, k, v, do):
    def f(q, k, v, do):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(do)

    return jax.jit(f)(q, k, v, do)


# Blocks of 128 (the smallest splash takes) keep interpret mode cheap; each case crosses a different edge:
#   cross_d64:  77 keys in one padded key block, 200 queries over two query blocks (the second padded), batch 2,
#               through the dispatch's spec string (the path the models take);
#   self_d64:   300 tokens = two full key blocks and one with 84 padded keys (online softmax across blocks);
#   self_d128:  block-aligned lengths and a head dim that needs no padding, with the fused backward kernel.
CASES = {
    "cross_d64": dict(shape=(2, 200, 77, 2, 64), spec="splash:block_q=128,block_kv=128"),
    "self_d64": dict(shape=(1, 300, 300, 2, 64), config=SplashConfig(block_q=128, block_kv=128)),
    "self_d128": dict(shape=(1, 256, 256, 2, 128), config=SplashConfig(block_q=128, block_kv=128, fused_bwd=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_interpret_matches_float64_reference(case):
    c = CASES[case]
    q, k, v, do = _inputs(*c["shape"])
    if "spec" in c:
        attend = lambda q, k, v: attention.dot_product_attention(q, k, v, impl=c["spec"])
    else:
        attend = lambda q, k, v: splash_attention.splash_attention(q, k, v, config=c["config"])
    # The Pallas kernel itself runs (not a fallback), forward and backward.
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(attend, *a[:3])[1](a[3]))(q, k, v, do))
    assert jaxpr.count("pallas_call") >= 2
    out, grads = _forward_and_grads(attend, q, k, v, do)
    out_ref, grads_ref = _reference(q, k, v, do)
    assert out.shape == q.shape and out.dtype == q.dtype
    # float32 kernel against float64: round-off only (~1e-6); a missing or doubled scale, or a padded key that
    # got weight, is off by >1e-2.
    np.testing.assert_allclose(np.asarray(out), out_ref, atol=2e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), g_ref, atol=5e-5, err_msg=f"d{name}")


def test_block_plan_clamps_to_short_sequences_and_pads_to_every_block():
    p = plan_blocks(SplashConfig(), 4096, 77, 64)  # SD cross-attention at 512 px, default 512 blocks
    assert (p.block_q, p.block_kv, p.lq_pad, p.lk_pad, p.d_pad) == (512, 128, 4096, 128, 128)
    p = plan_blocks(SplashConfig(), 64, 64, 64)  # the 8x8 mid-block: one lane group, not 512
    assert (p.block_q, p.lq_pad, p.lk_pad) == (128, 128, 128)
    p = plan_blocks(SplashConfig(block_q=256, block_kv=512, block_q_bwd=384, block_kv_compute=256), 1000, 300, 128)
    assert (p.block_q, p.block_q_bwd, p.lq_pad) == (256, 384, 1536)  # a multiple of both query blocks
    assert (p.block_kv, p.block_kv_compute, p.lk_pad) == (384, 384, 384)  # clamped; 256 no longer divides it


def test_key_padding_mask_masks_only_padded_keys():
    m = splash_attention.KeyPaddingMask(256, 384, 300)
    assert m.shape == (256, 384)
    assert m[0:128, 0:128].all() and m[128:256, 128:256].all()
    last = m[128:256, 256:384]
    assert last.shape == (128, 128) and last[:, :44].all() and not last[:, 44:].any()
    assert m == splash_attention.KeyPaddingMask(256, 384, 300) and hash(m) == hash(
        splash_attention.KeyPaddingMask(256, 384, 300))  # the kernel preprocessing caches on it


def test_splash_options_parse_and_fail_clearly():
    assert config_from_spec("splash") == SplashConfig()
    assert config_from_spec("auto:block_q=256, fused_bwd=true") == SplashConfig(block_q=256, fused_bwd=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        parse_options("block_q=100")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_options("blok_q=128")
    with pytest.raises(ValueError, match="integer"):
        parse_options("block_kv=big")
    with pytest.raises(ValueError, match="must divide"):
        parse_options("block_kv=256,block_kv_compute=384")
