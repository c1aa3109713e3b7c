"""Helpers every jsr model shares: abstract parameters and their logical axis names.

Convention: each model module has a plain method ``example_inputs(batch=1) -> tuple`` giving inputs that run its
``__call__`` (shapes only matter), so parameters can be derived without weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax


def abstract_params(module: nn.Module) -> Any:
    """The module's parameter tree as ``jax.ShapeDtypeStruct`` leaves, unboxed (no memory is allocated)."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()))
    return nn.meta.unbox(variables["params"])


def init_params(module: nn.Module, rng: jax.Array) -> Any:
    """Randomly initialised parameters (plain arrays, unboxed). One compiled program: an eager ``init``
    dispatches (and compiles) every initialiser separately, tens of seconds for a UNet."""
    return jax.jit(lambda key: nn.meta.unbox(module.init(key, *module.example_inputs())["params"]))(rng)


def logical_axes(module: nn.Module) -> Any:
    """A tree like the parameters whose leaves are ``PartitionSpec``s of *logical* axis names
    (``("embed", "mlp")``...). Map them onto a mesh with ``flax.linen.logical_to_mesh_sharding``."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()))
    return nn.get_partition_spec(variables)["params"]


def config_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` as keyword arguments of the dataclass ``cls`` (a module config read back from JSON); a key that is
    not a field is an error naming the known ones (a typo must not silently fall back to a default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    return dict(d)


class PatchGrid:
    """Token-count properties shared by the ViT-family configs (CLIP vision, ViT/DINO): a square ``image_size``
    cut into ``patch_size`` patches plus one class token. Mixed into frozen dataclasses with those two fields."""

    image_size: int
    patch_size: int

    @property
    def grid_size(self) -> int:
        """Patches per image side (``image_size // patch_size``, floored as transformers does)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per image: the class token plus ``grid_size ** 2`` patches (257 for ViT-L/14 at 224 px)."""
        return self.grid_size ** 2 + 1
