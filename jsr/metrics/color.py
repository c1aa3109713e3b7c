"""Colour conversions used by the fidelity metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma for "studio swing" 8-bit video, as the SR literature (basicsr, MATLAB's rgb2ycbcr) computes
# it: Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1], so Y spans [16, 235] on the 0..255 scale.
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)
BT601_Y_OFFSET = 16.0


def rgb_to_y(x: jax.Array) -> jax.Array:
    """BT.601 luma of RGB images.

    Args:
      x: [..., 3] RGB in [0, 1] (NHWC or HWC).
    Returns:
      [..., 1] float32 Y on the 0..255 scale, in [16, 235] for inputs in [0, 1].
    """
    if x.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: want RGB in the last axis (size 3), got shape {x.shape}")
    w = jnp.asarray(BT601_Y_WEIGHTS, jnp.float32)
    # An elementwise sum, not a matmul, so that no backend lowers it to reduced precision.
    y = jnp.sum(x.astype(jnp.float32) * w, axis=-1, keepdims=True)
    return y + BT601_Y_OFFSET
