"""Device mesh and logical-axis sharding rules (MaxText style), for 1 CPU, 8 fake CPUs, a GPU or a TPU pod.

The mesh has three named axes:

``data``    pure data parallelism: parameters replicated, the batch split.
``fsdp``    data parallelism with parameters (and optimizer state) split: the batch is split over it too.
``tensor``  model parallelism inside a layer (attention heads, MLP width).

Parameters carry *logical* axis names (``embed``, ``mlp``, ``heads``, ``conv_in``, ``conv_out``, ``norm``, ``vocab``,
``lora_rank``...; see ``jsr.models.layers``). ``rules`` map logical names to mesh axes. A dimension that a mesh
axis does not divide evenly stays replicated instead of failing (small layers such as a 4-channel ``conv_in``),
so one rule set serves every model size.

Activations follow the same table: the models mark block boundaries and attention heads with the logical names
of ``jsr.models.constraints`` (``activation_batch``, ``activation_heads``, ``activation_embed``), and a train step
traced inside :func:`tracing` turns them into ``with_sharding_constraint`` s on its mesh. Outside it (one device,
inference) they are no-ops.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jsr.models import constraints

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None for replicated). Frozen weights shard their large dims over fsdp, and the
# head/MLP dims over tensor; norms, LoRA ranks and small vectors stay replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "fsdp"),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    # Activations (jsr.models.constraints): the batch split as the input batch, attention heads over tensor,
    # block-boundary channels whole (map them to "tensor" to split the maps between blocks too).
    (constraints.BATCH, BATCH_AXES),
    (constraints.HEADS, "tensor"),
    (constraints.EMBED, None),
)


def parse_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules from a config: a sequence of ``(logical, mesh axis or None)`` pairs, or the same as a
    string (``--config.mesh.rules="(('batch', 'fsdp'), ('embed', None))"``). Mesh axes must be ``data``,
    ``fsdp``, ``tensor``, a tuple of them, or ``None``.

    Raises ValueError naming the bad entry.
    """
    import ast

    if isinstance(rules, str):
        try:
            rules = ast.literal_eval(rules)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"mesh.rules: not a Python literal of (logical, mesh_axis) pairs: {rules!r} ({e})") from None
    out = []
    for entry in rules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"mesh.rules: each rule is a (logical name, mesh axis) pair, got {entry!r}")
        name, axis = entry
        axes = axis if isinstance(axis, (tuple, list)) else (axis,)
        if any(a is not None and a not in MESH_AXES for a in axes):
            raise ValueError(f"mesh.rules: rule {name!r} maps to {axis!r}; mesh axes are {MESH_AXES} or None")
        out.append((name, tuple(axis) if isinstance(axis, list) else axis))
    return tuple(out)


def maybe_initialize_distributed(multihost: bool | None = None) -> None:
    """Start JAX's multi-host runtime on a TPU pod slice (or any multi-process job described by the
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment): see
    :func:`jsr.train.distributed.initialize`, which this calls. Safe to call twice."""
    from jsr.train import distributed

    distributed.initialize(None, multihost)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    One size may be -1: it takes whatever the others leave. Sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {len(devices)} are present")
    try:  # topology-aware placement on TPU/GPU; plain reshape where that is not available (CPU)
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - any failure of the optional topology helper falls back
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _mesh_axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """The mesh ``PartitionSpec`` for one array with the given logical axis names and shape.

    Each mesh axis is used at most once per array (first dimension wins); dims it does not divide replicate.
    """
    if logical is None:
        return P()
    return _spec(logical, shape, mesh, rules, fallback=None)


def _spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
          rules: Sequence[tuple[str, Any]], fallback: Any) -> P:
    # fallback: the entry of a named dimension that the rules leave out or whose mesh axes do not divide it.
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(tuple(logical), shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            out.append(fallback)
            continue
        axis = table[name]
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
        if not names:
            out.append(None)
        elif dim % _mesh_axis_size(mesh, names) == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(fallback)
    return P(*out)


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` constraining one activation (``jsr.models.constraints`` names per dimension).

    As :func:`logical_to_spec`, except that a dimension whose name the rules leave out, or whose mesh axes do
    not divide it (a batch of 2 over 4 batch shards), is left to XLA (``P.UNCONSTRAINED``) instead of being
    forced whole: a constraint must never undo a better layout XLA found. ``None`` names mean unsplit.
    """
    return _spec(logical, shape, mesh, rules, fallback=P.UNCONSTRAINED)


def activation_resolver(mesh: Mesh | AbstractMesh,
                        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> constraints.Resolver:
    """``(names, shape) -> NamedSharding`` on ``mesh`` by ``rules``: what :func:`tracing` gives the models."""
    return lambda names, shape: NamedSharding(mesh, activation_spec(names, shape, mesh, rules))


@contextlib.contextmanager
def tracing(mesh: Mesh | AbstractMesh | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Enter inside a step function that is traced for ``mesh``: the mesh becomes the abstract mesh in context
    (``jax.sharding.use_abstract_mesh``, which, unlike ``jax.set_mesh``, may be entered inside ``jax.jit``) so the
    attention dispatch sees it (``auto`` takes splash on a multi-chip TPU), and the models' activation
    constraints resolve on it by ``rules``. ``None`` or a one-device mesh: nothing changes."""
    if mesh is None or mesh.size == 1:
        yield
        return
    abstract = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract), constraints.activation_sharding(activation_resolver(mesh, rules)):
        yield


def tree_shardings(abstract: Any, logical: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of ``abstract`` (arrays or ShapeDtypeStructs) from the matching
    ``logical`` tree of PartitionSpecs of logical names (``jsr.models.common.logical_axes``)."""
    return jax.tree.map(
        lambda a, names: NamedSharding(mesh, logical_to_spec(names, a.shape, mesh, rules)),
        abstract, logical, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a fully replicated array (LoRA factors, scalars, RNG keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """Sharding of a batch array whose leading axis is split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))
