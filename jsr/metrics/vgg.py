"""VGG16 convolutional trunk (torchvision's ``vgg16().features``) in Flax linen, NHWC, shared by LPIPS and DISTS.

Both metrics read the activations after the last ReLU of each of the five blocks (``relu1_2``, ``relu2_2``,
``relu3_3``, ``relu4_3``, ``relu5_3``); they differ only in the down-sampling between blocks: LPIPS keeps
torchvision's 2x2 max pooling, DISTS replaces it with an L2 pooling (a fixed 3x3 Hann blur of ``x^2``, stride 2,
then a square root) so that its texture statistics are not aliased.

Parameter names follow torchvision's ``features`` indices (``features_0``, ``features_2``, ..., ``features_28``),
so :func:`jsr.weights.convert.torch_state_to_params` with ``indexed={"features"}`` maps torchvision's
``features.N.weight``/``bias`` onto them directly. The input normalisation (LPIPS' scaling layer, DISTS'
ImageNet mean/std) belongs to the caller.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.models.common import abstract_params
from jsr.models.layers import Conv
from jsr.weights import convert

# torchvision's configuration "D" (VGG16): conv widths, "M" marks a down-sampling layer. Each entry occupies
# one index of ``features`` and each conv is followed by a ReLU that occupies the next one.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_CHANNELS = (64, 128, 256, 512, 512)
INDEXED = ("features",)


def conv_indices() -> list[int]:
    """torchvision ``features`` indices of the 13 convolutions (0, 2, 5, 7, 10, ..., 28)."""
    out, i = [], 0
    for item in VGG16_LAYOUT:
        if item == "M":
            i += 1
        else:
            out.append(i)
            i += 2  # conv + ReLU
    return out


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """torchvision's ``MaxPool2d(2, 2)`` on NHWC: odd trailing rows/columns are dropped (floor)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _hann_3x3() -> np.ndarray:
    # The 5-tap Hann window without its zero end points is (0.5, 1, 0.5); the 2-D filter is its outer product,
    # normalised to sum 1 (DISTS, Ding et al. 2020, Sec. 3.1).
    a = np.hanning(5)[1:-1]
    g = np.outer(a, a)
    return g / g.sum()


def l2_pool(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """DISTS' L2 pooling on NHWC: ``sqrt(hann3x3 * x^2 + eps)``, depthwise, stride 2, padding 1.

    [N, H, W, C] -> [N, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C]. ``eps`` keeps the square root
    differentiable where the blurred energy is zero.
    """
    c = x.shape[-1]
    kernel = jnp.broadcast_to(jnp.asarray(_hann_3x3(), x.dtype)[:, :, None, None], (3, 3, 1, c))
    y = jax.lax.conv_general_dilated(
        jnp.square(x), kernel, window_strides=(2, 2), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return jnp.sqrt(y + eps)


class VGG16Features(nn.Module):
    """The 13-conv VGG16 trunk; returns the five block outputs after ReLU.

    Attributes:
      pooling: ``"max"`` (torchvision, LPIPS) or ``"l2"`` (DISTS) down-sampling between blocks.
      dtype: compute dtype (``None``: the input's).
    Input: [N, H, W, 3], already normalised by the caller (any range). Output: a tuple of five arrays
    [N, H/2^k, W/2^k, C_k] with C = (64, 128, 256, 512, 512), k = 0..4 (floor division for max pooling).
    """

    pooling: str = "max"
    dtype: Any = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, 32, 32, 3), jnp.float32),)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if self.pooling not in ("max", "l2"):
            raise ValueError(f"VGG16Features: pooling must be 'max' or 'l2', got {self.pooling!r}")
        pool = max_pool_2x2 if self.pooling == "max" else l2_pool
        taps = []
        i = 0
        for item in VGG16_LAYOUT:
            if item == "M":
                taps.append(x)  # the ReLU output that ends this block
                x = pool(x)
                i += 1
            else:
                x = Conv(item, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{i}")(x)
                x = nn.relu(x)
                i += 2
        taps.append(x)
        return tuple(taps)


def vgg16_params_from_torch(state: Mapping[str, np.ndarray], *, prefix: str = "features.",
                            dtype: Any = jnp.float32) -> dict:
    """torchvision-layout VGG16 conv tensors -> :class:`VGG16Features` parameters.

    Args:
      state: a state dict whose conv tensors are ``{prefix}N.weight`` [O, I, 3, 3] and ``{prefix}N.bias`` [O]
        for N in :func:`conv_indices` (torchvision's ``vgg16-397923af.pth`` with the default prefix); every
        other key (``classifier.*``...) is ignored.
      prefix: the key prefix of the conv tensors.
      dtype: parameter dtype.
    Raises:
      jsr.weights.convert.CheckpointMismatchError naming missing or mis-shaped tensors.
    """
    wanted = {f"{prefix}{i}.{leaf}" for i in conv_indices() for leaf in ("weight", "bias")}
    picked = {"features." + k[len(prefix):]: v for k, v in state.items() if k in wanted}
    return convert.torch_state_to_params(picked, abstract_params(VGG16Features()), INDEXED, model="VGG16",
                                         dtype=dtype)
