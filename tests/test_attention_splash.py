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


def _export_for_tpu(shape, spec=None, mesh=None):
    """jax.export of splash's forward+backward for TPU from abstract bf16 shapes: the kernels lower to Mosaic
    here; only the Mosaic compiler (on a TPU) comes later."""
    b, lq, lk, h, d = shape
    cfg = SplashConfig(interpret=False)

    def f(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: splash_attention.splash_attention(q, k, v, config=cfg), q, k, v)
        return out, vjp(out)

    def arg(length):
        sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct((b, length, h, d), jnp.bfloat16, sharding=sharding)

    return jax.export.export(jax.jit(f), platforms=["tpu"])(arg(lq), arg(lk), arg(lk)).mlir_module()


@pytest.mark.parametrize("shape", [(2, 4096, 4096, 5, 64), (2, 1024, 77, 10, 64)], ids=["self4096", "cross77"])
def test_splash_lowers_for_tpu_at_sd_sizes(shape):
    # SD-2.1 at 512 px: 64x64 latent self-attention with the default 512 blocks; explicit splash on the text
    # cross-attention (77 keys padded to one 128 block). Forward + dq + dkv kernels.
    assert _export_for_tpu(shape).count("tpu_custom_call") == 3


def test_splash_on_a_16_device_tpu_mesh_runs_per_shard():
    P = jax.sharding.PartitionSpec
    mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))  # v4-32: data x fsdp x tensor
    spec = P(("data", "fsdp"), None, None, None)
    # Without the mesh at trace time the kernel is left to XLA's partitioner, which cannot split it.
    with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
        _export_for_tpu((16, 4096, 4096, 6, 64), spec, mesh)
    with jax.sharding.use_abstract_mesh(mesh):
        module = _export_for_tpu((16, 4096, 4096, 6, 64), spec, mesh)
    assert module.count("tpu_custom_call") == 3
    # The kernels see one shard: 16 / (data 2 x fsdp 4) = 2 examples, 6 / tensor 2 = 3 heads.
    assert "tensor<2x3x4096x128xbf16>" in module


def test_splash_under_a_cpu_mesh_matches_reference():
    # The same shard_map on the 8 test CPUs, in interpret mode: batch over data x fsdp, heads over tensor.
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    q, k, v, _ = _inputs(4, 150, 150, 2, 64)
    sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    cfg = SplashConfig(block_q=128, block_kv=128)
    with jax.set_mesh(mesh):
        f = jax.jit(lambda q, k, v: splash_attention.splash_attention(q, k, v, config=cfg))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        out = f(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, np.zeros(q.shape))[0], atol=2e-5)
