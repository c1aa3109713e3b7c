"""The single attention entry point of jsr.

Every model (UNet transformer blocks, the VAE mid-block, CLIP) calls :func:`dot_product_attention`; the
implementation is a config string so the same weights run on CPU, GPU and TPU:

``"xla"``      head-major einsum + float32 softmax. The reference, and the fastest plain path on CPU.
``"jax"``      ``jax.nn.dot_product_attention`` with XLA's own lowering.
``"cudnn"``    ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention (GPU, bf16/f16).
``"chunked"``  blocked attention, one head and ``chunk_size`` queries at a time (default: a ~16 MB score block):
               memory grows linearly with the token count (1024+ px images), and it is the fastest form on
               XLA:CPU. ``auto`` uses it on CPU for long sequences. Unmasked calls over more than 16,384 keys
               (the staged VAE's whole-image mid-block attention on large images) also split the keys, with a
               running softmax (``KEY_BLOCKED_FROM``).
``"splash"``   Pallas splash attention (``jsr.models.splash_attention``): the TPU flash kernel, head dims padded to
               128, sequences padded to its blocks. Block sizes ride in the name: ``"splash:block_q=256,block_kv=512"``
               (``SplashConfig``'s fields; e.g. ``--config.model.attention=splash:block_q=256``). Under a mesh
               set with ``jax.set_mesh`` it runs per shard (``shard_map``; XLA cannot partition a Pallas kernel, so a
               multi-device program without one fails to compile on TPU). Off TPU it runs in Pallas interpret mode
               (slow; for tests). It takes no mask: a masked call (CLIP's causal text encoder) runs what ``auto``
               would pick without splash.
``"auto"``     picks per call from the backend, sequence lengths and an attention-memory budget:
               sequences of at most ``SHORT_SEQUENCE`` tokens (the 77-token text cross-attention, CLIP) -> ``xla``;
               TPU -> ``splash`` when unmasked, head dim <= ``SPLASH_MAX_HEAD_DIM`` and one device or a mesh set
               (``"auto:block_q=..."`` passes splash its blocks); GPU -> ``cudnn`` for bf16/f16 with head dim
               <= 128 and % 8; else ``chunked`` on CPU or beyond ``AUTO_CHUNK_BYTES`` of scores, ``xla`` otherwise.

Each distinct choice (requested name -> implementation, backend) is logged once (absl ``INFO``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import logging

from jsr.models import splash_config

IMPLEMENTATIONS = ("auto", "xla", "jax", "cudnn", "chunked", "splash")

# Score-matrix bytes (float32) above which ``auto`` switches to the chunked path on CPU/GPU.
AUTO_CHUNK_BYTES = 1 << 30
# Sequences this short (e.g. the 77-token text cross-attention) always take the plain path.
SHORT_SEQUENCE = 256
# cuDNN's fused (flash) attention takes head dims up to 128; the VAE mid-block's single 512-wide head does not fit.
CUDNN_MAX_HEAD_DIM = 128
# ``auto`` takes splash for head dims that pad to one 128-lane group (SD's UNet: 64). The VAE mid-block's single
# 512-wide head would hold 4x the VMEM per kernel block and has never run on a TPU here: it stays on XLA.
SPLASH_MAX_HEAD_DIM = 128
# Options may follow these names after a colon ("splash:block_q=256"); ``auto`` forwards them to splash.
_WITH_OPTIONS = ("splash", "auto")
_LOGGED: set[tuple[str, str, str]] = set()


def _probs(q, k, mask, scale):
    # Head-major layout: measured faster than the [B, L, H, D] einsum on XLA:CPU.
    qh = jnp.swapaxes(q, 1, 2)
    kh = jnp.swapaxes(k, 1, 2)
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh * jnp.asarray(scale, q.dtype), kh,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _apply_probs(probs, v):
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), jnp.swapaxes(v, 1, 2))
    return jnp.swapaxes(out, 1, 2)


def _xla(q, k, v, mask, scale):
    return _apply_probs(_probs(q, k, mask, scale), v)


def _block_size(lk: int, chunk_size: int | None) -> int:
    if chunk_size:
        return chunk_size
    # One [block, Lk] float32 score block of about 16 MB stays in the last-level cache on CPU: measured on the
    # 2-core CI machine (2026-11-23), 4096-token self-attention, 5 heads x 64: 1024-query blocks per head take
    # 175 ms against 383 ms for the whole-matrix einsum and 163 ms for PyTorch's fused SDPA.
    return max(128, 1 << int(math.log2(max(1, (4 << 20) // lk))))


# Beyond this many keys an unmasked ``chunked`` call also splits the keys (online softmax over key blocks of
# ``KEY_BLOCK``, queries in blocks of ``KEY_BLOCKED_QUERIES``): a [block, Lk] score block no longer fits the cache
# (with Lk = 187,500, the staged VAE's mid-block over a 4000x3000 image, a 128-query block is 96 MB), and
# streaming it through memory several times dominated. Measured on the 2-core CI machine under load (2026-11-30):
# 4096 queries x 187,500 keys, head dim 32: 8.8 s -> 3.7 s; 2048 x 32,768, dim 512: 4.6 s -> 2.5 s;
# 4096 x 32,768, dim 32: 0.91 s -> 0.67 s. Shorter key sequences (every UNet call up to 1024-px crops: 16,384
# tokens at most) keep the query-blocked path.
KEY_BLOCKED_FROM = 16385
KEY_BLOCK = 4096
KEY_BLOCKED_QUERIES = 512


def _key_blocked(qh, kh, vh):
    """Unmasked attention of ``qh`` [N, Lq, D] (scaled) over ``kh``, ``vh`` [N, Lk, D] with a running max and
    sum over key blocks (the flash-attention recurrence, in float32): no [Lq, Lk] block is ever held whole."""
    n, lq, d = qh.shape
    lk = kh.shape[1]
    bq, bk = min(KEY_BLOCKED_QUERIES, lq), KEY_BLOCK
    nq, nk = -(-lq // bq), -(-lk // bk)
    qb = jnp.pad(qh, ((0, 0), (0, nq * bq - lq), (0, 0))).reshape(n, nq, bq, d)
    kb = jnp.pad(kh, ((0, 0), (0, nk * bk - lk), (0, 0))).reshape(n, nk, bk, d)
    vb = jnp.pad(vh, ((0, 0), (0, nk * bk - lk), (0, 0))).reshape(n, nk, bk, d)
    valid = (jnp.arange(nk * bk) < lk).reshape(nk, bk)

    def one_query_block(q, ks, vs):
        def add_keys(carry, block):
            m, total, acc = carry
            kk, vv, ok = block
            s = jnp.einsum("qd,kd->qk", q, kk, preferred_element_type=jnp.float32)
            s = jnp.where(ok[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[:, None])
            shrink = jnp.exp(m - m_new)
            acc = acc * shrink[:, None] + jnp.matmul(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
            return (m_new, total * shrink + jnp.sum(p, axis=-1), acc), None

        init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, d), jnp.float32))
        (_, total, acc), _ = jax.lax.scan(add_keys, init, (ks, vs, valid))
        return (acc / total[:, None]).astype(vh.dtype)

    out = jax.lax.map(lambda a: jax.lax.map(lambda q: one_query_block(q, a[1], a[2]), a[0]), (qb, kb, vb))
    return out.reshape(n, nq * bq, d)[:, :lq]


def _chunked(q, k, v, mask, scale, chunk_size):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    # [B*H, L, D]: one head at a time keeps each score block small.
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2).reshape(b * h, lq, d)
    kh = jnp.swapaxes(k, 1, 2).reshape(b * h, lk, d)
    vh = jnp.swapaxes(v, 1, 2).reshape(b * h, lk, d)
    if mask is None and chunk_size is None and lk >= KEY_BLOCKED_FROM:
        return jnp.swapaxes(_key_blocked(qh, kh, vh).reshape(b, h, lq, d), 1, 2)
    block = min(_block_size(lk, chunk_size), lq)
    n_blocks = math.ceil(lq / block)
    pad = n_blocks * block - lq
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(b * h, n_blocks, block, d)
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, h, lq, lk)).reshape(b * h, lq, lk)
        if pad:
            m = jnp.pad(m, ((0, 0), (0, pad), (0, 0)), constant_values=True)
        m = m.reshape(b * h, n_blocks, block, lk)

    def block_attention(qb, kb, vb, mb):
        s = jnp.einsum("qd,kd->qk", qb, kb, preferred_element_type=jnp.float32)
        if mb is not None:
            s = jnp.where(mb, s, jnp.finfo(jnp.float32).min)
        p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        # Normalising the [block, D] output instead of the [block, Lk] probabilities saves a pass over the
        # score block; the result is the same softmax.
        o = jnp.matmul(p.astype(vb.dtype), vb)
        return (o.astype(jnp.float32) / jnp.sum(p, axis=-1, keepdims=True)).astype(vb.dtype)

    def per_head(args):
        if mask is None:
            qi, ki, vi = args
            return jax.lax.map(lambda qb: block_attention(qb, ki, vi, None), qi)
        qi, ki, vi, mi = args
        return jax.lax.map(lambda a: block_attention(a[0], ki, vi, a[1]), (qi, mi))

    out = jax.lax.map(per_head, (qh, kh, vh) if mask is None else (qh, kh, vh, m))
    out = out.reshape(b, h, n_blocks * block, d)[:, :, :lq]
    return jnp.swapaxes(out, 1, 2)


def split_spec(impl: str) -> tuple[str, str]:
    """``"splash:block_q=256"`` -> ``("splash", "block_q=256")``; a name without options -> ``(name, "")``.

    Raises ValueError for an unknown name or options on an implementation that takes none."""
    name, _, options = impl.partition(":")
    name = name.strip()
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is unknown; choose one of {IMPLEMENTATIONS}")
    if options.strip():
        if name not in _WITH_OPTIONS:
            raise ValueError(f"attention implementation {name!r} takes no options (got {impl!r}); only "
                             f"{' and '.join(_WITH_OPTIONS)} do (splash block sizes)")
        splash_config.parse_options(options)  # a typo fails here, on every backend, not first on a TPU
    return name, options


def resolve_implementation(impl: str, q_shape, k_shape, dtype, *, masked: bool = False) -> str:
    """The concrete implementation name ``auto`` (or an explicit ``impl``, options allowed) maps to.

    Args:
      impl: an implementation name, optionally with splash options (``"splash:block_q=256"``).
      q_shape, k_shape: [B, Lq, H, D] and [B, Lk, H, D].
      dtype: the compute dtype.
      masked: whether the call has a mask (splash takes none: a masked splash call gets ``auto``'s other choice).
    Returns:
      one of ``xla``, ``jax``, ``cudnn``, ``chunked``, ``splash`` (never ``auto``).
    """
    name, _ = split_spec(impl)
    if name == "splash" and masked:
        return resolve_implementation("auto", q_shape, k_shape, dtype, masked=True)
    if name != "auto":
        return name
    b, lq, h, d = q_shape
    lk = k_shape[1]
    if lk <= SHORT_SEQUENCE or lq <= SHORT_SEQUENCE:
        return "xla"
    backend = jax.default_backend()
    if backend == "tpu" and not masked and d <= SPLASH_MAX_HEAD_DIM and _splash_can_partition():
        return "splash"
    if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and d <= CUDNN_MAX_HEAD_DIM and d % 8 == 0):
        return "cudnn"
    # Blocked attention is both memory-bounded and the fastest XLA form on CPU (see _block_size); on GPU/TPU
    # the whole-matrix einsum is faster while its scores fit the budget.
    if backend == "cpu" or b * h * lq * lk * 4 > AUTO_CHUNK_BYTES:
        return "chunked"
    return "xla"


def _splash_can_partition() -> bool:
    # XLA cannot partition a Mosaic kernel: in a program over several devices splash must run under shard_map,
    # which needs the mesh at trace time (``jax.set_mesh``). Whether a program spans several devices is not
    # known while tracing, so with several devices and no mesh set ``auto`` stays on XLA rather than risk
    # "Mosaic kernels cannot be automatically partitioned" at compile time.
    return jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().empty


def _log_choice(impl: str, which: str, masked: bool) -> None:
    # Once per distinct decision, not per call: a UNet traces ~16 attention layers per program.
    key = (impl, which, jax.default_backend())
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    why = " (a masked call: splash takes no mask)" if masked and split_spec(impl)[0] == "splash" else ""
    logging.info("attention: %r runs %r on %s%s", impl, which, key[2], why)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          impl: str = "auto", chunk_size: int | None = None) -> jax.Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v``.

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, H, D] keys and values.
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True means "may attend".
      impl: one of :data:`IMPLEMENTATIONS`, splash/auto optionally with splash block sizes
        (``"splash:block_q=256,block_kv=512"``, see ``jsr.models.splash_config.SplashConfig``).
      chunk_size: queries per block for ``"chunked"`` (default: sized to a ~16 MB score block).
    Returns:
      [B, Lq, H, D] in q's dtype. Scores and softmax are float32 on every path.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    which = resolve_implementation(impl, q.shape, k.shape, q.dtype, masked=mask is not None)
    _log_choice(impl, which, mask is not None)
    if which == "xla":
        return _xla(q, k, v, mask, scale)
    if which == "chunked":
        return _chunked(q, k, v, mask, scale, chunk_size)
    if which in ("jax", "cudnn"):
        m = None if mask is None else jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale,
                                            implementation=None if which == "jax" else "cudnn")
    # Imported here: Pallas costs ~0.6 s to import, and only splash needs it.
    from jsr.models import splash_attention

    return splash_attention.splash_attention(q, k, v, scale=scale, config=splash_config.config_from_spec(impl))


def attention_with_probs(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention that also returns its probabilities (the ``"xla"`` path, made explicit).

    For reading attention maps (``jsr.models.unet``'s ``capture_attention``): the whole [B, H, Lq, Lk] matrix is
    materialised, so use it only where those maps are wanted; everything else goes through
    :func:`dot_product_attention`. The output is computed from the returned probabilities with the same
    operations as the ``"xla"`` implementation.

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, H, D] keys and values.
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True means "may attend".
    Returns:
      (out [B, Lq, H, D] in v's dtype, probs [B, H, Lq, Lk] float32 = ``softmax(q k^T / sqrt(d))``, rows sum
      to 1).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    probs = _probs(q, k, mask, 1.0 / math.sqrt(q.shape[-1]))
    return _apply_probs(probs, v), probs
