"""Restoration over several local devices: every call's batch (whole images, or tiles) split along its first axis
over a 1-D ``data`` mesh, the parameters replicated on every device.

    dp = DataParallel(select_devices("all"))
    f = dp.map(lambda params, x: net(params, x), batched=(False, True))
    y = f(dp.replicate(params), x)          # numpy [n, ...]: x's n rows, padded to a multiple of the devices

Each device runs, through ``shard_map``, the program one device would run on its share of the rows (no
communication between devices: every function mapped here is per example), so the result is the one-device
result wherever XLA compiles the per-device program as it compiles the one-device program at that batch size.
A batch that does not divide by the device count is padded by repeating its last row, and the padded rows are
dropped from the output.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def select_devices(spec: str | int | None) -> list[jax.Device]:
    """The local devices a restorer uses, from a ``--devices`` value.

    ``"auto"`` (or ``None``): every local device on a GPU or TPU, one on a CPU (JAX's CPU "devices", made by
    ``--xla_force_host_platform_device_count``, share the same cores: splitting a batch over them adds no compute,
    only compilations); ``"all"``: every local device; ``N``: the first ``N``.

    Raises ValueError (one line) for a malformed value or more devices than there are.
    """
    local = jax.local_devices()
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return local if jax.default_backend() != "cpu" else local[:1]
    if text == "all":
        return local
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--devices={spec!r}: want auto, all or a device count") from None
    if not 1 <= n <= len(local):
        raise ValueError(f"--devices={n}: this process has {len(local)} {jax.default_backend()} device(s)")
    return local[:n]


def describe(devices: Sequence[jax.Device]) -> str:
    """One line for the console: how many devices restore, and how."""
    kind = devices[0].platform if devices else "?"
    if len(devices) == 1:
        return f"restoring on 1 {kind} device"
    return (f"restoring on {len(devices)} {kind} devices (data parallel: each call's images or tiles split over "
            "them, the parameters replicated)")


def _pad_rows(x: Any, n: int) -> np.ndarray:
    """``x`` [m, ...] as numpy with its last row repeated to ``n`` rows."""
    x = np.asarray(x)
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


class DataParallel:
    """A 1-D ``data`` mesh over ``devices`` and the helpers that run per-example functions on it."""

    def __init__(self, devices: Sequence[jax.Device]):
        if not devices:
            raise ValueError("data parallel restoration needs at least one device")
        self.devices = list(devices)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._rows = NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def size(self) -> int:
        """How many devices share each batch."""
        return len(self.devices)

    def padded(self, n: int) -> int:
        """``n`` rows rounded up to a multiple of :attr:`size`."""
        return -(-n // self.size) * self.size

    def replicate(self, tree: Any) -> Any:
        """``tree`` (parameters, a prompt embedding) copied to every device once, so calls do not move it."""
        return jax.device_put(tree, self._replicated)

    def shard(self, tree: Any, n: int) -> Any:
        """Every leaf of ``tree`` ([n, ...] each) padded to :meth:`padded` rows and split over the devices
        (each device receives only its rows)."""
        rows = self.padded(n)
        return jax.tree.map(lambda x: jax.device_put(_pad_rows(x, rows), self._rows), tree)

    def map(self, fn: Callable[..., Any], batched: Sequence[bool], donate: Sequence[int] = ()) -> Callable[..., Any]:
        """``fn(*args)`` run data parallel: the arguments flagged in ``batched`` are pytrees of per-example arrays
        ``[n, ...]`` (numpy or JAX; ``None`` allowed) split over the devices, the others are replicated (pass
        them through :meth:`replicate` once). Every output leaf must be per example ``[n', ...]`` with ``n'`` a
        multiple of the per-device rows (``fn``'s own batch). ``donate``: argument positions whose buffers the
        program may reuse (as ``jax.jit``'s ``donate_argnums``).

        Returns a function of the same arguments whose outputs are numpy arrays cut to the real rows (the
        padding dropped): the callers gather to the host anyway (tile blending, the staged VAE's carries)."""
        batched = tuple(bool(b) for b in batched)
        specs = tuple(PartitionSpec(AXIS) if b else PartitionSpec() for b in batched)
        # check_vma off: the functions are plain per-example networks; nothing varies across devices that
        # needs tracking, and the check rejects replicated closed-over constants that XLA handles fine.
        program = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec(AXIS),
                                        check_vma=False), donate_argnums=tuple(donate))

        def run(*args):
            if len(args) != len(batched):
                raise TypeError(f"data parallel call: {len(args)} arguments, {len(batched)} declared")
            leaves = [x for a, b in zip(args, batched) if b for x in jax.tree.leaves(a)]
            if not leaves:
                raise ValueError("data parallel call: no batched argument holds an array")
            n = int(leaves[0].shape[0])
            placed = [self.shard(a, n) if b else a for a, b in zip(args, batched)]
            out = program(*placed)
            rows = self.padded(n)
            # Outputs may hold k rows per input row (a stage's moments keep one row per window and image): cut
            # each at the same fraction.
            return jax.tree.map(lambda y: np.asarray(y)[:np.shape(y)[0] * n // rows], out)

        run.program = program
        return run
