"""Traced programs kept on disk beside JAX's persistent compilation cache, so that a rerun skips Python tracing.

JAX's persistent cache stores what XLA compiled, keyed by the lowered module; to find that key a rerun must
still trace and lower the Python function. For a train step on a 2-core CPU that is most of a warm start (CTSR
stage 1 on the embedded tiny model, 2026-11-30: 18-22 s tracing and 5 s lowering before a 32 s cache read).
:func:`cached_jit` keeps the lowered step as a serialized :mod:`jax.export` artefact instead: a rerun reads it
(well under a second), wraps it in a ``jax.jit`` that lowers in ~2 s, and the compile comes from the persistent
cache as before.

The first run goes through the same artefact (trace, export, then call the export), so that a fresh run and a
resumed one run one and the same program: resuming stays bit-exact whether or not the artefact existed.

The key is everything the trace can depend on: the caller's description of the program (for the train step,
the run's config and the base model's architecture), the arguments' tree structure (static fields included: a
LoRA's rank and alpha), shapes, dtypes and shardings, the jsr source files, the versions of jax, jaxlib, flax
and optax, the backend and its devices, and the ``JSR_*``/``XLA_FLAGS`` environment. Anything unreadable or a
program that cannot be exported (host callbacks, custom calls outside jax.export's stable set) falls back to a
plain ``jax.jit``, logged once. Where: ``<compilation cache>/jsr-programs`` (off when the compilation cache is
off, and on several processes, where each process lowers for the whole job).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import jax
from absl import logging

from jsr.weights.io import write_bytes_atomic

SUFFIX = ".jaxprogram"


def program_folder() -> Path | None:
    """``<jax_compilation_cache_dir>/jsr-programs``, or None when JAX's persistent cache is off."""
    where = jax.config.jax_compilation_cache_dir
    return Path(where) / "jsr-programs" if where else None


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the jsr package's Python sources (names and contents): a code change is a new program."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _versions() -> str:
    out = []
    for dist in ("jax", "jaxlib", "flax", "optax"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=?")
    return " ".join(out)


def _describe_args(args: tuple) -> str:
    leaves, treedef = jax.tree.flatten(args)

    def one(x: Any) -> str:
        sharding = getattr(x, "sharding", None)
        return f"{getattr(x, 'shape', ())}/{getattr(x, 'dtype', type(x).__name__)}/{sharding}"

    return f"{treedef}|" + ";".join(one(x) for x in leaves)


def program_key(name: str, description: str, args: tuple) -> str:
    """The artefact's key (hex sha256) for ``name`` traced on ``args`` (see the module docstring)."""
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith("JSR_") and k not in ("JSR_XLA_CACHE", "JSR_CACHE")) or k == "XLA_FLAGS")
    parts = [name, description, _describe_args(args), source_digest(), _versions(), jax.default_backend(),
             repr([str(d) for d in jax.devices()]), repr(env)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class CachedProgram:
    """A jitted function whose trace is kept on disk (:func:`cached_jit`): call it like the ``jax.jit`` it wraps;
    ``.lower(*args)`` lowers what a call would run. ``source`` tells, after the first call, where the program
    came from: ``"disk"`` (read back), ``"traced"`` (traced now and stored) or ``"jit"`` (no artefact: cache
    off, several processes, or the export failed)."""

    def __init__(self, fn: Callable, name: str, description: str, jit_kwargs: dict[str, Any]):
        self._fn, self._name, self._description = fn, name, description
        self._jit_kwargs = jit_kwargs
        self._programs: dict[str, Callable] = {}
        self._by_signature: dict[tuple, Callable] = {}
        self.source: str | None = None

    def _plain(self) -> Callable:
        if "jit" not in self._programs:
            self._programs["jit"] = jax.jit(self._fn, **self._jit_kwargs)
        return self._programs["jit"]

    def _program(self, args: tuple) -> Callable:
        folder = program_folder()
        if folder is None or jax.process_count() > 1:
            self.source = "jit"
            return self._plain()
        key = program_key(self._name, self._description, args)
        if key in self._programs:
            return self._programs[key]
        path = folder / f"{self._name}-{key[:32]}{SUFFIX}"
        in_tree = jax.tree.structure(args)
        program = None
        if path.exists():
            try:
                exported, out_tree, saved_in = pickle.loads(path.read_bytes())
                exported = jax.export.deserialize(exported)
                if saved_in != in_tree:
                    raise ValueError("argument structure differs")
                program, self.source = self._wrap(exported, out_tree), "disk"
            except Exception as e:  # noqa: BLE001 - a damaged or foreign artefact is traced anew
                logging.warning("program cache: %s unreadable (%s); tracing again", path, e)
        if program is None:
            try:
                exported, out_tree = self._export(args)
                write_bytes_atomic(path, pickle.dumps((exported.serialize(), out_tree, in_tree)))
                program, self.source = self._wrap(exported, out_tree), "traced"
            except Exception as e:  # noqa: BLE001 - e.g. a custom call jax.export will not serialize
                logging.info("program cache: %s not exported (%s: %s); plain jit", self._name, type(e).__name__,
                             e)
                self.source = "jit"
                return self._plain()
        self._programs[key] = program
        return program

    def _export(self, args: tuple) -> tuple[Any, Any]:
        """The jitted function exported for ``args``, its trees swapped for flat tuples (a TrainState or a LoRA
        node cannot be serialized, their leaves can), and the real output tree."""
        exported = jax.export.export(self._plain())(*args)
        n_in, n_out = exported.in_tree.num_leaves, exported.out_tree.num_leaves
        flat = dataclasses.replace(exported, in_tree=jax.tree.structure((tuple(range(n_in)), {})),
                                   out_tree=jax.tree.structure(tuple(range(n_out))))
        return flat, exported.out_tree

    def _wrap(self, exported, out_tree) -> Callable:
        def call(*args):
            return jax.tree.unflatten(out_tree, exported.call(*jax.tree.leaves(args)))

        call.__name__ = call.__qualname__ = self._name.replace("-", "_")  # XLA's module: jit_<name>, in logs
        return jax.jit(call, **self._jit_kwargs)

    def _for(self, args: tuple) -> Callable:
        # Every step calls this: the full key (hashing the sources, printing every sharding) is computed once per
        # argument signature, the signature itself is a flatten and a tuple (~1 ms for a full-size step's leaves).
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None),
                                     getattr(x, "sharding", None)) for x in leaves))
        program = self._by_signature.get(signature)
        if program is None:
            program = self._by_signature[signature] = self._program(args)
        return program

    def __call__(self, *args):
        return self._for(args)(*args)

    def lower(self, *args):
        return self._for(args).lower(*args)


def cached_jit(fn: Callable, *, name: str, description: str, **jit_kwargs) -> CachedProgram:
    """``jax.jit(fn, **jit_kwargs)`` whose trace is kept on disk (see the module docstring).

    ``name``: the artefact's file-name prefix (``train-step``); ``description``: a string holding everything the
    trace depends on besides the arguments and jsr's code (e.g. the run's config as JSON and the base model's
    architecture). ``jit_kwargs``: ``in_shardings``, ``out_shardings``, ``donate_argnums``,
    ``compiler_options``, as for ``jax.jit`` (positional arguments only)."""
    return CachedProgram(fn, name, description, jit_kwargs)
