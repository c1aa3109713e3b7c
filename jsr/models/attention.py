"""The single attention entry point of jsr.

Every model (UNet transformer blocks, the VAE mid-block, CLIP) calls :func:`dot_product_attention`; the
implementation is a config string so the same weights run on CPU, GPU and TPU:

``"xla"``      head-major einsum + float32 softmax. The reference, and the fastest plain path on CPU.
``"jax"``      ``jax.nn.dot_product_attention`` with XLA's own lowering.
``"cudnn"``    ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention (GPU, bf16/f16).
``"chunked"``  query-chunked attention: the score matrix exists for ``chunk_size`` queries at a time, so memory
               grows linearly with the token count (1024+ px images on CPU/GPU).
``"splash"``   Pallas splash attention on TPU. Not built yet: asking for it is an error that says so; ``auto``
               never picks it (it takes ``xla`` on TPU until then).
``"auto"``     picks per call from the backend, sequence lengths and an attention-memory budget.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "jax", "cudnn", "chunked", "splash")

# Score-matrix bytes (float32) above which ``auto`` switches to the chunked path on CPU/GPU.
AUTO_CHUNK_BYTES = 1 << 30
# Sequences this short (e.g. the 77-token text cross-attention) always take the plain path.
SHORT_SEQUENCE = 256


def _xla(q, k, v, mask, scale):
    # Head-major layout: measured faster than the [B, L, H, D] einsum on XLA:CPU.
    qh = jnp.swapaxes(q, 1, 2)
    kh = jnp.swapaxes(k, 1, 2)
    vh = jnp.swapaxes(v, 1, 2)
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh * jnp.asarray(scale, q.dtype), kh,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, vh)
    return jnp.swapaxes(out, 1, 2)


def _chunked(q, k, v, mask, scale, chunk_size):
    b, lq, h, d = q.shape
    n_chunks = math.ceil(lq / chunk_size)
    pad = n_chunks * chunk_size - lq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    qc = qp.reshape(b, n_chunks, chunk_size, h, d).swapaxes(0, 1)
    if mask is None:
        out = jax.lax.map(lambda qi: _xla(qi, k, v, None, scale), qc)
    else:
        m = jnp.broadcast_to(mask, (b, h, lq, k.shape[1]))
        m = jnp.pad(m, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True) if pad else m
        mc = m.reshape(b, h, n_chunks, chunk_size, -1).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda a: _xla(a[0], k, v, a[1], scale), (qc, mc))
    out = out.swapaxes(0, 1).reshape(b, n_chunks * chunk_size, h, d)
    return out[:, :lq]


def resolve_implementation(impl: str, q_shape, k_shape, dtype) -> str:
    """The concrete implementation ``auto`` (or an explicit ``impl``) maps to for these shapes."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is unknown; choose one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    b, lq, h, _ = q_shape
    lk = k_shape[1]
    if lk <= SHORT_SEQUENCE or lq <= SHORT_SEQUENCE:
        return "xla"
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if b * h * lq * lk * 4 > AUTO_CHUNK_BYTES:
        return "chunked"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          impl: str = "auto", chunk_size: int = 1024) -> jax.Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v``.

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, H, D] keys and values.
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True means "may attend".
      impl: one of :data:`IMPLEMENTATIONS`.
      chunk_size: queries per chunk for ``"chunked"``.
    Returns:
      [B, Lq, H, D] in q's dtype. Scores and softmax are float32 on every path.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    which = resolve_implementation(impl, q.shape, k.shape, q.dtype)
    if which == "xla":
        return _xla(q, k, v, mask, scale)
    if which == "chunked":
        return _chunked(q, k, v, mask, scale, chunk_size)
    if which in ("jax", "cudnn"):
        m = None if mask is None else jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale,
                                            implementation=None if which == "jax" else "cudnn")
    raise ValueError("attention implementation 'splash' (Pallas, TPU) is not built yet in jsr; "
                     "use 'auto' or 'xla' on TPU")
