"""GAN losses on multi-level discriminator logits (``jsr.models.vision_disc``: a tuple of per-level logit maps).

Each level's logits are averaged over its elements, then the levels are averaged (every level weighs the same
whatever its grid).

=================  ================================================  ===========================================
kind               discriminator loss                                generator loss
=================  ================================================  ===========================================
``hinge``          ``relu(1 - D(real)) + relu(1 + D(fake))``          ``-D(fake)``
``nonsat``         ``softplus(-D(real)) + softplus(D(fake))``         ``softplus(-D(fake))``
=================  ================================================  ===========================================

``nonsat`` is the non-saturating (logistic) GAN loss, what CODSR's release trains with
(``vision_aided_loss``'s ``multilevel_sigmoid_s``); ``hinge`` is the default here, as the issue asks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

KINDS = ("hinge", "nonsat")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"GAN loss {kind!r}: expected one of {KINDS}")


def _levels(logits: Sequence[jax.Array], fn) -> jax.Array:
    return jnp.mean(jnp.stack([jnp.mean(fn(x.astype(jnp.float32))) for x in logits]))


def discriminator_loss(real: Sequence[jax.Array], fake: Sequence[jax.Array], kind: str = "hinge") -> jax.Array:
    """The discriminator's loss (a float32 scalar) for logits on real and on generated images."""
    _check(kind)
    if kind == "hinge":
        return _levels(real, lambda x: jax.nn.relu(1.0 - x)) + _levels(fake, lambda x: jax.nn.relu(1.0 + x))
    return _levels(real, lambda x: jax.nn.softplus(-x)) + _levels(fake, jax.nn.softplus)


def generator_loss(fake: Sequence[jax.Array], kind: str = "hinge") -> jax.Array:
    """The generator's adversarial loss (a float32 scalar) for the discriminator's logits on its images."""
    _check(kind)
    if kind == "hinge":
        return _levels(fake, lambda x: -x)
    return _levels(fake, lambda x: jax.nn.softplus(-x))
