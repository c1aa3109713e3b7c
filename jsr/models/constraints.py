"""Sharding constraints on activations, named by logical axes; resolved to a mesh only by whoever traces.

The models mark their block boundaries (``image(x)``: NHWC maps, batch over the batch axes, channels as the rules
say) and attention heads (``heads(q)``), but know nothing of meshes: a training step enters
:func:`activation_sharding` with a resolver built from the mesh and the same logical-axis rules as the parameters
(``jsr.train.sharding.activation_resolver``). Outside that context (one device, inference, evaluation) every
constraint is the identity, so inference programs are unchanged.

Logical names of activation dimensions (entries of ``config.mesh.rules``; a name the rules leave out is left to
XLA rather than forced):

``activation_batch``     the batch dimension (default rule: ``data`` x ``fsdp``, as the input batch).
``activation_heads``     attention heads of ``[B, L, H, D]`` queries/keys/values (default: ``tensor``).
``activation_embed``     channels of block-boundary maps ``[B, H, W, C]`` (default: unsplit, the Megatron layout:
                         the residual stream stays whole on every ``tensor`` shard).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import jax

BATCH = "activation_batch"
HEADS = "activation_heads"
EMBED = "activation_embed"

# (logical names per dimension, shape) -> a jax.sharding.Sharding for jax.lax.with_sharding_constraint.
Resolver = Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding]

_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("jsr_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(resolve: Resolver | None) -> Iterator[None]:
    """Resolve the models' activation constraints with ``resolve`` while tracing inside this context (``None``:
    constraints off). Enter it inside the traced function, so every trace of a jitted step sees it."""
    token = _RESOLVER.set(resolve)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from its per-dimension logical ``names`` (``None``: that dimension
    unsplit); the identity outside :func:`activation_sharding`."""
    resolve = _RESOLVER.get()
    if resolve is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"activation constraint names {tuple(names)} do not match an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, resolve(tuple(names), tuple(x.shape)))


def image(x: jax.Array) -> jax.Array:
    """Constrain an NHWC map ``[B, H, W, C]`` at a block boundary: batch over the batch axes, channels as the
    ``activation_embed`` rule says, H and W unsplit."""
    return constrain(x, (BATCH, None, None, EMBED))


def heads(x: jax.Array) -> jax.Array:
    """Constrain attention inputs/outputs ``[B, L, H, D]``: batch over the batch axes, heads over
    ``activation_heads``'s axis."""
    return constrain(x, (BATCH, None, HEADS, None))
