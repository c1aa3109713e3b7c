"""FiDeSR's LRRB (latent residual refinement block), Flax linen, NHWC, plus its PyTorch state-dict converter.

FiDeSR (PiSA-SR-style residual generator at UNet timestep 1) refines the UNet's residual ``eps_hat`` with a small
dense network that also sees the LQ latent ``z_L``::

    r' = eps_hat + LRRB(concat[z_L, eps_hat]),     z = z_L - r'

Architecture (``fidesr.py`` of the release, classes ``LRRB`` and ``DenseBlock``; sizes from
``src/my_utils/training_utils.py``: ``lrrb_in_ch 8``, ``lrrb_mid_ch 64``, ``lrrb_growth 32``, ``lrrb_res_sc 0.2``):

* ``in_conv``: 1x1 conv ``in_channels -> mid_channels`` (with bias);
* ``db1``, ``db2``, ``db3``: dense blocks, each ``f <- f + res_scale * DB(f)``; a dense block has five 3x3 convs
  (padding 1, bias) ``conv1..conv5``: ``conv_k`` (k <= 4) maps ``mid + (k-1) growth -> growth`` channels on the
  concatenation ``[f, x1, .., x_{k-1}]`` followed by SiLU; ``conv5`` maps ``mid + 4 growth -> mid`` with no
  activation and is **zero-initialised** (weight and bias);
* ``out_conv``: 1x1 conv ``mid_channels -> in_channels // 2`` (with bias), **zero-initialised**, so a fresh LRRB
  outputs exactly 0 and the model starts as PiSA-SR.

Parameter names equal the release's ``lrrb_state_dict`` keys (``in_conv.weight``, ``db1.conv1.weight``, ...,
``out_conv.bias``): the Flax tree is ``{"in_conv": {"kernel" HWIO, "bias"}, "db1": {"conv1": ..}, ..,
"out_conv": ..}``, plain (unboxed) arrays once loaded or made by :func:`init_lrrb_params`.

Zero initialisation: jsr's :class:`~jsr.models.layers.Conv` always draws its kernel from LeCun-normal, so
:class:`LRRB` overrides ``init`` to zero ``conv5`` of every block and ``out_conv`` afterwards (the release zeroes
the same tensors with ``nn.init.zeros_``). Every init path (``LRRB(...).init``, ``jsr.models.common.init_params``,
:func:`init_lrrb_params`) therefore starts at the identity.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.models.common import abstract_params, config_fields
from jsr.models.layers import Conv
from jsr.weights import convert

Dtype = Any

# The release's ``LRRB`` has exactly three dense blocks of five convs each (not configurable there either).
NUM_BLOCKS = 3
CONVS_PER_BLOCK = 5
_ZERO_INIT = tuple((f"db{i + 1}", f"conv{CONVS_PER_BLOCK}") for i in range(NUM_BLOCKS)) + (("out_conv",),)


@dataclasses.dataclass(frozen=True)
class LRRBConfig:
    """Sizes of an :class:`LRRB`, as the release's ``--lrrb_*`` arguments (defaults are the release's).

    Attributes:
      in_channels: input channels, ``concat[z_L, eps_hat]`` = 2 x latent channels (8 for SD). The output has
        ``in_channels // 2`` channels (the latent's), as in the release.
      mid_channels: width of the trunk (``lrrb_mid_ch``).
      growth: dense-block growth rate (``lrrb_growth``).
      res_scale: scale of each dense block's output before it is added back (``lrrb_res_sc``).
    """

    in_channels: int = 8
    mid_channels: int = 64
    growth: int = 32
    res_scale: float = 0.2

    @property
    def out_channels(self) -> int:
        """Output channels, ``in_channels // 2`` (the latent's channels)."""
        return self.in_channels // 2

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain JSON-able dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as a JSON string (sorted keys, so equal configs give equal strings)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LRRBConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently fall back)."""
        return cls(**config_fields(cls, d))

    @classmethod
    def from_json(cls, s: str) -> "LRRBConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(s))


class DenseBlock(nn.Module):
    """Five-conv dense block (ESRGAN-style, without the inner residual): [N, H, W, C] -> [N, H, W, C].

    ``x_k = SiLU(conv_k([x, x_1, .., x_{k-1}]))`` for k = 1..4 (``growth`` channels each), output
    ``conv5([x, x_1, .., x_4])`` with C channels and no activation. ``conv5`` is zeroed by :meth:`LRRB.init`.
    """

    channels: int
    growth: int = 32
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = [x]
        for k in range(1, CONVS_PER_BLOCK):
            h = Conv(self.growth, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{k}")(
                jnp.concatenate(feats, axis=-1))
            feats.append(nn.silu(h))
        return Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    name=f"conv{CONVS_PER_BLOCK}")(jnp.concatenate(feats, axis=-1))


class LRRB(nn.Module):
    """FiDeSR's latent residual refinement block: ``concat[z_L, eps_hat]`` [N, h, w, 8] -> ``delta`` [N, h, w, 4].

    Attributes:
      config: sizes (:class:`LRRBConfig`).
      dtype: compute dtype (``None``: the input's). Parameters stay float32 unless loaded otherwise.
    Input: NHWC latents (SD's *scaled* latent space, any range). Output: the correction added to ``eps_hat``
    (see :func:`lrrb_refine`); exactly 0 at initialisation.
    """

    config: LRRBConfig = LRRBConfig()
    dtype: Dtype | None = None

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """A [batch, 8, 8, in_channels] zero input (shapes only matter)."""
        return (jnp.zeros((batch, 8, 8, self.config.in_channels), jnp.float32),)

    def init(self, rngs, *args, **kwargs):  # noqa: D102 - documented in the class/module docstring
        # Conv's initialiser is fixed (LeCun normal); zero the release's zero-initialised layers afterwards.
        variables = super().init(rngs, *args, **kwargs)
        return _zero_init_layers(variables)

    @nn.compact
    def __call__(self, x_cat: jax.Array) -> jax.Array:
        cfg = self.config
        if x_cat.ndim != 4 or x_cat.shape[-1] != cfg.in_channels:
            raise ValueError(f"LRRB: want [N, h, w, {cfg.in_channels}] (NHWC), got {x_cat.shape}")
        f = Conv(cfg.mid_channels, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="in_conv")(x_cat)
        for i in range(NUM_BLOCKS):
            f = f + DenseBlock(cfg.mid_channels, cfg.growth, dtype=self.dtype, name=f"db{i + 1}")(f) * cfg.res_scale
        return Conv(cfg.out_channels, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="out_conv")(f)


def _zero_init_layers(variables: Any) -> Any:
    """``variables`` with the kernel and bias of every zero-initialised layer replaced by zeros (boxes kept)."""
    variables = dict(variables)
    params = dict(variables["params"])  # shallow copies along the edited paths only

    def zero(leaf):
        if isinstance(leaf, nn.meta.AxisMetadata):
            return leaf.replace_boxed(jnp.zeros_like(leaf.unbox()))
        return jnp.zeros_like(leaf)

    for path in _ZERO_INIT:
        node = params
        for p in path[:-1]:
            node[p] = dict(node[p])
            node = node[p]
        layer = dict(node[path[-1]])
        node[path[-1]] = {k: zero(v) for k, v in layer.items()}
    variables["params"] = params
    return variables


def init_lrrb_params(rng: jax.Array, config: LRRBConfig = LRRBConfig()) -> dict:
    """Fresh LRRB parameters (plain arrays, float32): LeCun-normal kernels, zero biases, and the release's
    zero-initialised layers (each block's ``conv5``, ``out_conv``) all zero, so ``LRRB`` outputs exactly 0."""
    module = LRRB(config)
    return jax.jit(lambda key: nn.meta.unbox(module.init(key, *module.example_inputs())["params"]))(rng)


def lrrb_apply(params: Mapping, x_cat: jax.Array, config: LRRBConfig = LRRBConfig(), *,
               dtype: Dtype | None = None) -> jax.Array:
    """``LRRB(x_cat)``: [N, h, w, in_channels] NHWC -> [N, h, w, in_channels // 2] (same dtype as compute)."""
    return LRRB(config, dtype=dtype).apply({"params": params}, x_cat)


def lrrb_refine(params: Mapping, z_lq: jax.Array, eps_hat: jax.Array, config: LRRBConfig = LRRBConfig(), *,
                dtype: Dtype | None = None) -> jax.Array:
    """The refined residual ``r' = eps_hat + LRRB(concat[z_L, eps_hat])`` (release: ``r_tilde``).

    Args:
      params: LRRB parameters (:func:`init_lrrb_params` or :func:`lrrb_from_torch`).
      z_lq: LQ latent ``z_L`` [N, h, w, C] (scaled SD latent space), NHWC.
      eps_hat: the UNet's residual at timestep 1, [N, h, w, C]; concatenated *after* ``z_lq`` (release order).
      config: sizes; ``config.in_channels`` must be 2 C.
      dtype: LRRB compute dtype (``None``: the inputs').
    Returns:
      [N, h, w, C] in ``eps_hat``'s dtype. The generator's latent is then ``z = z_L - r'``.
    """
    delta = lrrb_apply(params, jnp.concatenate([z_lq, eps_hat.astype(z_lq.dtype)], axis=-1), config, dtype=dtype)
    return eps_hat + delta.astype(eps_hat.dtype)


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: to CPU numpy without importing torch here
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def lrrb_config_from_state(state: Mapping[str, Any], res_scale: float = 0.2) -> LRRBConfig:
    """The :class:`LRRBConfig` whose shapes fit a release LRRB state dict (``res_scale`` is not stored in the
    weights: pass the run's ``--lrrb_res_sc``, default 0.2)."""
    w_in = _to_numpy(state["in_conv.weight"])  # [mid, in, 1, 1]
    w_c1 = _to_numpy(state["db1.conv1.weight"])  # [growth, mid, 3, 3]
    return LRRBConfig(in_channels=int(w_in.shape[1]), mid_channels=int(w_in.shape[0]),
                      growth=int(w_c1.shape[0]), res_scale=res_scale)


def lrrb_from_torch(state_dict: Mapping[str, Any], config: LRRBConfig | None = None, *,
                    dtype: Any = jnp.float32) -> dict:
    """Release PyTorch LRRB state dict -> Flax parameters.

    Args:
      state_dict: the release's ``lrrb_state_dict`` (``in_conv.weight`` [64, 8, 1, 1], ``db1.conv1.weight``
        [32, 64, 3, 3], ..., ``out_conv.bias`` [4]); torch tensors or numpy arrays, OIHW. A whole release
        checkpoint (a dict holding ``"lrrb_state_dict"``) is accepted too.
      config: the sizes to expect; ``None`` infers them from the shapes (:func:`lrrb_config_from_state`).
      dtype: dtype of the returned arrays.
    Returns:
      ``{"in_conv": {"kernel" [1, 1, 8, 64], "bias"}, "db1": {"conv1": ...}, ..., "out_conv": ...}``.
    Raises:
      ``jsr.weights.convert.CheckpointMismatchError`` naming missing, unexpected or mis-shaped tensors.
    """
    if "lrrb_state_dict" in state_dict:
        state_dict = state_dict["lrrb_state_dict"]
    state = {k: _to_numpy(v) for k, v in state_dict.items()}
    if config is None:
        config = lrrb_config_from_state(state)
    return convert.torch_state_to_params(state, abstract_params(LRRB(config)), (), model="LRRB", dtype=dtype)


def lrrb_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Flax LRRB parameters -> the release's state dict layout: numpy arrays, OIHW weights, keys exactly
    ``in_conv.weight``, ``db{1,2,3}.conv{1..5}.{weight,bias}``, ``out_conv.{weight,bias}``. Load into the
    release's ``LRRB`` with ``load_state_dict({k: torch.from_numpy(v) ...})``."""
    return convert.params_to_torch_state(params, ())
