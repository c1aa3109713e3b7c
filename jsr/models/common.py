"""Helpers every jsr model shares: abstract parameters and their logical axis names.

Convention: each model module has a plain method ``example_inputs(batch=1) -> tuple`` giving inputs that run its
``__call__`` (shapes only matter), so parameters can be derived without weights.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np


def abstract_params(module: nn.Module) -> Any:
    """The module's parameter tree as ``jax.ShapeDtypeStruct`` leaves, unboxed (no memory is allocated)."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()))
    return nn.meta.unbox(variables["params"])


def init_params(module: nn.Module, rng: jax.Array) -> Any:
    """Randomly initialised parameters (plain arrays, unboxed). One compiled program: an eager ``init``
    dispatches (and compiles) every initialiser separately, tens of seconds for a UNet."""
    return jax.jit(lambda key: nn.meta.unbox(module.init(key, *module.example_inputs())["params"]))(rng)


def host_rng(seed: int | jax.Array, path: str) -> np.random.Generator:
    """A numpy generator for one named leaf (``path``, e.g. ``"down_blocks_0/conv1/kernel"``) of a seeded random
    tree: ``seed`` an int or a concrete JAX key (its key data words). Keyed by the path, so a leaf's values do not
    depend on which other leaves exist. Host-side random stand-ins use it instead of a JAX draw per leaf, which
    compiles a program per shape."""
    words = [int(w) for w in np.asarray(jax.random.key_data(seed)).ravel()] if isinstance(seed, jax.Array) \
        else [int(seed)]
    return np.random.default_rng([*words, zlib.crc32(path.encode())])


def random_params(module: nn.Module, seed: int | jax.Array, noise: float = 0.02) -> Any:
    """Seeded random parameters for ``module`` (a jsr Flax model with ``example_inputs()``; ``seed`` an int or a
    concrete JAX key, see :func:`host_rng`), as numpy arrays of
    the parameters' dtypes, drawn on the host without compiling anything: for stand-in models of runs without
    weights (the embedded tiny model, a random LPIPS trunk). Not for modules whose initialisation is part of the
    method (zero-initialised heads): use :func:`init_params` there.

    Flax's default initialisers redrawn with numpy from the abstract parameter tree: ``kernel`` lecun-normal
    (std ``1/sqrt(fan_in)``, fan-in = every axis but the last), ``bias`` zeros, ``scale`` ones, anything else
    (embedding tables) normal(0.02); then every leaf gets ``noise`` of extra normal noise, so zero-initialised
    layers (biases, norms' shifts) cannot hide mistakes in whatever consumes the model. Each leaf draws from its
    own generator keyed by ``seed`` and its path, so adding a layer leaves every other leaf's values as they were.

    Why not :func:`init_params`: compiling the tiny UNet's init took ~60 s of CPU on the 2-core machine
    (2026-11-30) even with LLVM's optimisations off; ``jax.eval_shape`` traces it in ~3 s and numpy draws the few
    MB in milliseconds.
    """
    shapes = abstract_params(module)

    def draw(path, leaf):
        rng = host_rng(seed, jax.tree_util.keystr(path, simple=True, separator="/"))
        shape, last = tuple(leaf.shape), str(getattr(path[-1], "key", path[-1]))
        if last == "kernel":
            base = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif last == "bias":
            base = np.zeros(shape)
        elif last == "scale":
            base = np.ones(shape)
        else:
            base = 0.02 * rng.standard_normal(shape)
        return (base + noise * rng.standard_normal(shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


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
