"""Pallas splash attention (TPU flash attention) behind jsr's attention dispatch.

``jax.experimental.pallas.ops.tpu.splash_attention`` takes one example's [H, L, D] queries/keys/values, head dims
that fill the 128-wide vector lanes, sequence lengths that its blocks divide, and applies no softmax scale
(its kernel computes ``softmax(q k^T) v``). SD's attention has head dim 64, sequence lengths such as 77 (text
tokens) or 64 (the 8x8 mid-block) and wants ``1/sqrt(d)``, so :func:`splash_attention` adapts them:

- the scale is applied to ``q`` before the kernel, in q's dtype (as the ``xla`` path does);
- q/k/v are zero-padded on the head dim to a multiple of 128 (zero columns change no dot product; the padded
  output columns are sliced off);
- both sequences are zero-padded to a multiple of their block size, and padded *keys* are masked out by a lazy
  splash mask that is full except the last key columns: padded queries still see every real key (no empty softmax
  row) and are sliced off;
- the batch is a ``vmap`` of the multi-head kernel;
- under a mesh (``jax.set_mesh``) it runs per shard in ``shard_map``: XLA cannot partition a Mosaic kernel
  (without it a multi-device TPU program fails to lower: "Mosaic kernels cannot be automatically partitioned").

Block sizes come from :class:`SplashConfig`, written in an attention spec string
(``"splash:block_q=256,block_kv=512"``, e.g. ``--config.model.attention=splash:block_q=256``). Off TPU the kernel
runs in Pallas interpret mode (the same kernel as a scan in XLA; slow, for tests and CPU checks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from jsr.models.splash_config import SplashConfig, SplashPlan, plan_blocks


@dataclasses.dataclass(frozen=True)
class KeyPaddingMask(mask_lib.Mask):
    """A lazy [rows, cols] splash mask, True for the first ``valid`` keys of every query row.

    The kernel's preprocessing reads it block by block (``mask[rows_slice, cols_slice]``): a dense array of
    lq x lk booleans (16M at 4096 tokens) would only cost memory and hashing time.
    """

    rows: int
    cols: int
    valid: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def __getitem__(self, idx) -> np.ndarray:
        i, j = (s.indices(n) for s, n in zip(idx, self.shape))
        keys = np.arange(*j) < self.valid
        return np.broadcast_to(keys, (len(range(*i)), keys.size)).copy()


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, p: SplashPlan, fused_bwd: bool, interpret: bool):
    """The multi-head splash kernel of one plan: [H, Lq_pad, D_pad] x 2 [H, Lk_pad, D_pad] -> [H, Lq_pad, D_pad]."""
    bwd = dict(block_q_dkv=p.block_q_bwd, block_kv_dkv=p.block_kv_bwd, block_kv_dkv_compute=p.block_kv_bwd)
    if not fused_bwd:
        bwd.update(block_q_dq=p.block_q_bwd, block_kv_dq=p.block_kv_bwd)
    sizes = sa.BlockSizes(block_q=p.block_q, block_kv=p.block_kv, block_kv_compute=p.block_kv_compute,
                          use_fused_bwd_kernel=fused_bwd, **bwd)
    one = (mask_lib.FullMask((p.lq_pad, p.lk_pad)) if p.lk == p.lk_pad
           else KeyPaddingMask(p.lq_pad, p.lk_pad, p.lk))
    mask = sa.MultiHeadMask(tuple(one for _ in range(heads)))
    # The kernel holds its block tables as device arrays; built inside a jit trace they would be tracers of
    # that trace, and this cache would leak them into the next one.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _mesh_axes(mesh, b: int, h: int, batch_axes: tuple[str, ...], head_axis: str | None):
    """The mesh axes that split the batch (those of ``batch_axes`` in the mesh whose product divides ``b``) and
    the heads (``head_axis`` if it divides ``h``); the other mesh axes compute the same shard redundantly."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch, ways = [], 1
    for axis in batch_axes:
        if sizes.get(axis, 1) > 1 and b % (ways * sizes[axis]) == 0:
            batch.append(axis)
            ways *= sizes[axis]
    head = head_axis if head_axis and sizes.get(head_axis, 1) > 1 and h % sizes[head_axis] == 0 else None
    return tuple(batch), head


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     config: SplashConfig = SplashConfig(), batch_axes: tuple[str, ...] = ("data", "fsdp"),
                     head_axis: str | None = "tensor") -> jax.Array:
    """``softmax(scale * q k^T) v`` with the Pallas splash kernel; no mask (padding is masked internally).

    A Mosaic kernel cannot be partitioned by XLA: in a program over several devices it must run per shard. When
    a mesh is set (``jax.set_mesh``, as a multi-device train step traces), the kernel runs under ``shard_map``
    over it, the batch split over ``batch_axes`` and the heads over ``head_axis`` (the axes of
    ``jsr.train.sharding``; an axis that is absent or does not divide the dimension is not used).

    Args:
      q: [B, Lq, H, D] queries.
      k, v: [B, Lk, H, D] keys and values (Lk may differ from Lq: cross-attention).
      scale: softmax scale (default ``1/sqrt(D)``).
      config: block sizes and interpret mode.
      batch_axes, head_axis: mesh axes for the batch and head dimensions under a mesh.
    Returns:
      [B, Lq, H, D] in q's dtype. Scores, softmax and the value sum are float32 inside the kernel.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if k.shape != (b, lk, h, d) or v.shape != k.shape:
        raise ValueError(f"splash attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D] with the same B, H, D; "
                         f"got q{q.shape} k{k.shape} v{v.shape}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    interpret = jax.default_backend() != "tpu" if config.interpret is None else config.interpret
    p = plan_blocks(config, lq, lk, d)

    def per_shard(q, k, v):
        # [B, L, H, D] -> [B, H, L_pad, D_pad]; zero padding (see the module docstring for why it is exact).
        def heads_major(x, length, length_pad):
            x = jnp.swapaxes(x, 1, 2)
            return jnp.pad(x, ((0, 0), (0, 0), (0, length_pad - length), (0, p.d_pad - d)))

        kernel = _kernel(q.shape[2], p, config.fused_bwd, interpret)
        qp = heads_major(q * jnp.asarray(scale, q.dtype), lq, p.lq_pad)
        out = jax.vmap(kernel)(qp, heads_major(k, lk, p.lk_pad), heads_major(v, lk, p.lk_pad))
        return jnp.swapaxes(out[:, :, :lq, :d], 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_shard(q, k, v)
    batch, head = _mesh_axes(mesh, b, h, batch_axes, head_axis)
    spec = jax.sharding.PartitionSpec(batch or None, None, head, None)
    # check_vma=False: the splash kernel declares no per-axis variance on its outputs, which the check requires.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
