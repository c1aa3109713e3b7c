"""Generic PyTorch state dict <-> Flax parameter tree conversion.

jsr modules are named after their diffusers/transformers counterparts, so one rule set converts every model:

* a path component ``name_N`` whose ``name`` is in the model's *indexed* set (``down_blocks``, ``resnets``,
  ``to_out``, ``layers``...) is the PyTorch list entry ``name.N``; every other component is kept as it is
  (``conv_in``, ``linear_1`` are plain names);
* leaves: ``kernel`` [in, out] <-> ``weight`` [out, in]; ``kernel`` HWIO <-> ``weight`` OIHW; ``scale`` and
  ``embedding`` <-> ``weight``; ``bias`` <-> ``bias``; LoRA ``a``/``b`` <-> ``lora_A.weight``/``lora_B.weight``.

Loading is strict: the expected tensors come from the module's abstract parameters, and any missing,
unexpected or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_INDEXED = re.compile(r"^(.+)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                  "a": "lora_A.weight", "b": "lora_B.weight"}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors (all named)."""


def torch_key(path: tuple[str, ...], indexed: Iterable[str]) -> str:
    """The PyTorch state-dict key of the Flax parameter at ``path`` (e.g. ``('down_blocks_0', 'resnets_1',
    'conv1', 'kernel')`` -> ``down_blocks.0.resnets.1.conv1.weight``)."""
    indexed = set(indexed)
    parts = []
    for p in path[:-1]:
        m = _INDEXED.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in indexed else p)
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"parameter {'/'.join(path)}: leaf name {leaf!r} has no PyTorch counterpart")
    parts.append(_LEAF_TO_TORCH[leaf])
    return ".".join(parts)


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout for one tensor (see module docstring)."""
    if leaf in ("kernel", "a", "b"):
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
    return value


def to_flax_layout(leaf: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor whose Flax shape is ``flax_shape``.

    A [out, in, 1, 1] PyTorch weight also fills a 2-D Flax kernel (old checkpoints stored some linear layers,
    e.g. VAE attention projections, as 1x1 convs).
    """
    if leaf in ("kernel", "a", "b"):
        if value.ndim == 4 and len(flax_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def params_to_torch_state(params: Mapping, indexed: Iterable[str]) -> dict[str, np.ndarray]:
    """Flax parameters -> PyTorch state dict (numpy arrays, contiguous, same dtype)."""
    flat = traverse_util.flatten_dict(unbox(params))
    return {torch_key(path, indexed): np.require(to_torch_layout(path[-1], np.asarray(v)), requirements="C")
            for path, v in flat.items()}


def unbox(tree: Any) -> Any:
    """Strip Flax partitioning boxes (``nn.LogicallyPartitioned``) from a parameter tree."""
    import flax.linen as nn

    return nn.meta.unbox(tree)


def torch_state_to_params(state: Mapping[str, np.ndarray], abstract_params: Mapping, indexed: Iterable[str], *,
                          model: str, dtype: Any = None, ignore: Iterable[str] = (),
                          rename: Callable[[str], str] | None = None) -> dict:
    """PyTorch state dict -> Flax parameter tree shaped like ``abstract_params``.

    Args:
      state: PyTorch-layout tensors (numpy), e.g. from :func:`jsr.weights.io.read_state_dict`.
      abstract_params: the module's parameters as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of init).
      indexed: list-container names of the model (see :func:`torch_key`).
      model: the model's name, for error messages.
      dtype: cast every parameter to this dtype (default: keep the abstract params' dtype).
      ignore: regular expressions of PyTorch keys to drop silently (buffers such as ``position_ids``).
      rename: maps legacy PyTorch key names to the current ones before matching.
    Raises:
      CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor.
    """
    patterns = [re.compile(p) for p in ignore]
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}
    flat = traverse_util.flatten_dict(unbox(abstract_params))
    expected = {torch_key(path, indexed): path for path in flat}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
    out = {}
    for key, path in expected.items():
        if key not in state:
            continue
        want = tuple(flat[path].shape)
        value = to_flax_layout(path[-1], np.asarray(state[key]), want)
        if tuple(value.shape) != want:
            problems.append(f"tensor {key!r} has shape {tuple(np.shape(state[key]))} "
                            f"but the model expects {tuple(to_torch_layout(path[-1], np.empty(want)).shape)}")
            continue
        out[path] = jnp.asarray(value, dtype=dtype or flat[path].dtype)
    if problems:
        raise CheckpointMismatchError(f"{model} checkpoint does not match the model config: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
