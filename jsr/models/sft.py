"""CODSR's LQ-guided feature modulation (an SFT layer fed by the raw LQ pixels), Flax linen, NHWC, plus its
PyTorch state-dict converter.

CODSR conditions its one-step UNet on the *uncompressed* LQ image, not only on its VAE latent: the LQ pixels are
folded into the latent grid by a pixel unshuffle and two small conv heads predict a per-pixel, per-channel
``(scale, shift)`` for the UNet's ``conv_in`` output (``jsr.models.unet``'s ``conv_in_modulation`` hook)::

    cond          = PixelUnshuffle(8)(x_LQ)                  [B, H/8, W/8, 3 * 64 = 192]
    scale         = conv1_s(SiLU(conv0_s(cond)))             [B, H/8, W/8, C]   (C = the UNet's block_out_channels[0])
    shift         = conv1_b(SiLU(conv0_b(cond)))
    h             = conv_in(z_t) * (1 + scale / k) + shift / k,       k = sqrt(1 - abar_t) / sqrt(abar_t)

``conv0_*`` are 3x3 convs ``192 -> C``, ``conv1_*`` 3x3 convs ``C -> C``, both padding 1 with bias. ``conv1_*`` are
**zero-initialised** (weight and bias), so a fresh SFT outputs exactly zero and the UNet starts unmodulated.
The division by ``k`` (CODSR's ``eps_to_mu_coeff``) is the caller's (:func:`sft_modulation`): it depends on the
timestep, not on the module.

Parameter names are the release's ``state_dict_sft`` keys (``codsr.py``, class ``SFTLayer``):
``SFT_scale_conv0.{weight,bias}``, ``SFT_scale_conv1...``, ``SFT_shift_conv0...``, ``SFT_shift_conv1...``; the Flax
tree is ``{"SFT_scale_conv0": {"kernel" HWIO, "bias"}, ...}``. The pixel unshuffle is PyTorch's channel order
(``out[c * 64 + 8 i + j] = in[c][8 y + i, 8 x + j]``), so released weights apply unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.models.common import abstract_params, config_fields
from jsr.models.layers import Conv
from jsr.weights import convert

Dtype = Any

HEADS = ("scale", "shift")
_ZERO_INIT = tuple(f"SFT_{h}_conv1" for h in HEADS)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Sizes of an :class:`LQSFT`.

    Attributes:
      channels: output width ``C``: the UNet's ``block_out_channels[0]`` (320 for SD 2.1; 32 on the tiny model).
      factor: the pixel-unshuffle factor, the VAE's downsampling (8 for SD).
      image_channels: channels of the LQ image (3, RGB).
    """

    channels: int = 320
    factor: int = 8
    image_channels: int = 3

    @property
    def in_channels(self) -> int:
        """Channels after the unshuffle: ``image_channels * factor ** 2`` (192 for SD)."""
        return self.image_channels * self.factor ** 2

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (an export's ``config.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SFTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently fall back)."""
        return cls(**{k: int(v) for k, v in config_fields(cls, d).items()})


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """PyTorch's ``PixelUnshuffle(factor)`` in NHWC: [B, H, W, C] -> [B, H/f, W/f, C f^2], output channel
    ``c f^2 + f i + j`` holding input channel ``c`` at offset ``(i, j)`` of each ``f x f`` block.

    Raises ValueError when H or W is not a multiple of ``factor``."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle: image {h}x{w} is not a multiple of {factor} (pad it first)")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


class LQSFT(nn.Module):
    """The SFT heads: LQ image [B, H, W, 3] in [-1, 1] -> ``(scale, shift)``, each [B, H/8, W/8, C].

    Attributes:
      config: sizes (:class:`SFTConfig`).
      dtype: compute dtype (``None``: the input's). Parameters are float32 unless loaded otherwise.
    """

    config: SFTConfig = SFTConfig()
    dtype: Dtype | None = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """A [batch, f, f, 3] zero image (shapes only matter)."""
        f = self.config.factor
        return (jnp.zeros((batch, f, f, self.config.image_channels), jnp.float32),)

    def init(self, rngs, *args, **kwargs):  # noqa: D102 - documented in the module docstring
        # Conv's initialiser is fixed (LeCun normal); the release zeroes both heads' second conv.
        variables = dict(super().init(rngs, *args, **kwargs))
        params = dict(variables["params"])
        for name in _ZERO_INIT:
            params[name] = jax.tree.map(jnp.zeros_like, params[name])
        variables["params"] = params
        return variables

    @nn.compact
    def __call__(self, x_lq: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if x_lq.ndim != 4 or x_lq.shape[-1] != cfg.image_channels:
            raise ValueError(f"LQSFT: want an image [B, H, W, {cfg.image_channels}] (NHWC), got {x_lq.shape}")
        cond = pixel_unshuffle(x_lq, cfg.factor)
        out = []
        for head in HEADS:
            h = Conv(cfg.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"SFT_{head}_conv0")(cond)
            h = Conv(cfg.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     name=f"SFT_{head}_conv1")(nn.silu(h))
            out.append(h)
        return out[0], out[1]


def init_sft_params(rng: jax.Array, config: SFTConfig = SFTConfig()) -> dict:
    """Fresh SFT parameters (plain float32 arrays): LeCun-normal first convs, zero biases, zero second convs, so
    :func:`sft_apply` returns exact zeros."""
    module = LQSFT(config)
    return jax.jit(lambda key: nn.meta.unbox(module.init(key, *module.example_inputs())["params"]))(rng)


def sft_apply(params: Mapping, x_lq: jax.Array, *, dtype: Dtype | None = None) -> tuple[jax.Array, jax.Array]:
    """``(scale, shift)`` of the LQ image ``x_lq`` [B, H, W, 3] in [-1, 1] (H, W multiples of the factor), each
    [B, H/8, W/8, C] in the compute dtype. The sizes come from the parameter shapes."""
    return LQSFT(sft_config_of(params), dtype=dtype).apply({"params": params}, x_lq)


def sft_modulation(params: Mapping, x_lq: jax.Array, k: jax.Array, *,
                   dtype: Dtype | None = None) -> tuple[jax.Array, jax.Array]:
    """The UNet's ``conv_in_modulation`` for timestep coefficient ``k = sqrt(1 - abar_t) / sqrt(abar_t)``
    (a scalar or [B]): ``(scale / k, shift / k)``, float32 [B, H/8, W/8, C]."""
    scale, shift = sft_apply(params, x_lq, dtype=dtype)
    k = jnp.asarray(k, jnp.float32)
    k = k.reshape(k.shape + (1,) * (4 - k.ndim)) if k.ndim else k
    return scale.astype(jnp.float32) / k, shift.astype(jnp.float32) / k


def sft_config_of(params: Mapping) -> SFTConfig:
    """The :class:`SFTConfig` whose shapes ``params`` have (conv0's kernel is [3, 3, 3 f^2, C])."""
    k = params["SFT_scale_conv0"]["kernel"]
    cin, c = int(k.shape[2]), int(k.shape[3])
    f = int(round((cin / 3) ** 0.5))
    if 3 * f * f != cin:
        raise ValueError(f"SFT: conv0 takes {cin} channels, not 3 x f^2 for an integer unshuffle factor f")
    return SFTConfig(channels=c, factor=f)


def sft_from_torch(state_dict: Mapping[str, Any], *, dtype: Any = jnp.float32) -> dict:
    """The release's ``state_dict_sft`` (``SFT_scale_conv0.weight`` [C, 192, 3, 3] OIHW, ...; torch tensors or
    numpy arrays) -> Flax parameters ``{"SFT_scale_conv0": {"kernel" [3, 3, 192, C], "bias"}, ...}``.

    Raises ``jsr.weights.convert.CheckpointMismatchError`` naming missing, unexpected or mis-shaped tensors."""
    state = {k: _to_numpy(v) for k, v in state_dict.items()}
    w = state.get("SFT_scale_conv0.weight")
    if w is None or w.ndim != 4:
        raise convert.CheckpointMismatchError("SFT state dict: no 4-D SFT_scale_conv0.weight "
                                              f"(keys: {sorted(state)[:8]})")
    cin, c = int(w.shape[1]), int(w.shape[0])
    f = int(round((cin / 3) ** 0.5))
    return convert.torch_state_to_params(state, abstract_params(LQSFT(SFTConfig(channels=c, factor=f))), (),
                                         model="SFT", dtype=dtype)


def sft_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Flax SFT parameters -> the release's state-dict layout (numpy, OIHW, keys ``SFT_{scale,shift}_conv{0,1}.
    {weight,bias}``), loadable into the release's ``SFTLayer`` with ``load_state_dict``."""
    return convert.params_to_torch_state(params, ())


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, without importing torch here
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)
