"""Rematerialisation (gradient checkpointing) of the UNet and VAE: a mode and a ``jax.checkpoint`` policy.

Modes (the ``remat`` attribute of ``UNet2DConditionModel`` / ``AutoencoderKL``, ``config.model.remat``):

``none``    nothing recomputed: every intermediate activation the backward pass needs is kept (fastest, most memory).
``blocks``  each UNet down/mid/up block and each VAE encoder/decoder block is one checkpoint: the backward pass
            keeps only the blocks' inputs (and what ``policy`` lets it save) and recomputes the rest of one block
            at a time. The usual choice for training at 512 px.
``full``    the whole UNet forward and each whole VAE half (encoder, decoder) are one checkpoint each: only the
            networks' inputs are kept; the backward pass recomputes one network at a time with all of its
            activations live. Least kept between networks, so it pays off when several networks' activations
            would otherwise be held at once (a generator, teachers and a loss network in one step).

The policy (``config.model.remat_policy``) names a ``jax.checkpoint_policies`` member that decides which of a
checkpoint's intermediates are saved after all: ``nothing_saveable`` (the default: recompute everything),
``dots_saveable`` (keep matmul outputs; convolutions are recomputed), ``dots_with_no_batch_dims_saveable``,
``everything_saveable``... Parameter trees are the same in every mode (lifted transforms keep module names), and a
forward pass without gradients computes the same numbers: inference never needs remat.
"""

from __future__ import annotations

import inspect
from typing import Callable

import flax.linen as nn
import jax

MODES = ("none", "blocks", "full")
DEFAULT_POLICY = "nothing_saveable"
# XLA:CPU expands jax.checkpoint's optimization barriers early in its pipeline (this pass), after which CSE merges
# the recomputation back into the forward pass: remat then keeps every activation anyway and only adds compile
# time. With the pass off, the CPU program keeps the recomputation. Measured on a tiny UNet + VAE-encoder gradient
# (tests/test_remat.py): temp memory 25.6 MB -> 11.1 MB with "blocks"; with the pass on, "blocks" used more.
_CPU_KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


class RematConfigError(ValueError):
    """``remat`` / ``remat_policy`` names no mode or policy (a user's config error: one line in ``train.py``)."""


def remat_mode(value: bool | str | None) -> str:
    """The mode of a ``remat`` setting: ``True`` (the older boolean form) is ``blocks``, ``False``/``None``
    ``none``; a string must be one of :data:`MODES`.

    Raises :class:`RematConfigError` (a ValueError) naming the valid modes."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "blocks"
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    raise RematConfigError(f"remat={value!r} is not a rematerialisation mode; choose one of {', '.join(MODES)}")


def _is_policy(fn: object) -> bool:
    # A policy is called as policy(prim, *args, **params); the other members of jax.checkpoint_policies are
    # factories that build one from names or from two policies (save_only_these_names(*names),
    # save_from_both_policies(p1, p2)...), and take no **params.
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    required = [p for p in params if p.default is p.empty and p.name != "prim"
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return inspect.Parameter.VAR_KEYWORD in kinds and not required


def policy_names() -> tuple[str, ...]:
    """The ``jax.checkpoint_policies`` members usable by name (policies, not policy factories), sorted."""
    cp = jax.checkpoint_policies
    return tuple(sorted(n for n in dir(cp) if not n.startswith("_") and _is_policy(getattr(cp, n))))


def checkpoint_policy(name: str | None) -> Callable | None:
    """The ``jax.checkpoint`` policy called ``name`` (``None`` or ``""``: jax's default, save nothing).

    Raises :class:`RematConfigError` (a ValueError) listing the valid names for an unknown one."""
    if not name:
        return None
    names = policy_names()
    if name not in names:
        raise RematConfigError(f"remat_policy={name!r} is not a jax.checkpoint_policies policy; choose one of "
                               f"{', '.join(names)}")
    return getattr(jax.checkpoint_policies, name)


def checkpointed(cls: type[nn.Module], enabled: bool, policy: str | None,
                 static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``cls`` under ``nn.remat`` with ``policy`` when ``enabled``, else ``cls`` itself.

    ``static_argnums`` index ``__call__``'s positional arguments counting ``self`` as 0 (flax's convention):
    arguments that are not arrays (an upsampling size) must be static."""
    if not enabled:
        return cls
    return nn.remat(cls, policy=checkpoint_policy(policy), static_argnums=static_argnums)


def compiler_options(mode: str, backend: str | None = None) -> dict[str, str] | None:
    """XLA options a program with rematerialisation ``mode`` needs on ``backend`` (default: JAX's) for the
    recomputation to survive compilation: on CPU, keep jax.checkpoint's barriers (see ``_CPU_KEEP_REMAT``);
    ``None`` elsewhere or without remat. Pass to ``jax.jit(..., compiler_options=...)``."""
    if remat_mode(mode) == "none" or (backend or jax.default_backend()) != "cpu":
        return None
    return dict(_CPU_KEEP_REMAT)
