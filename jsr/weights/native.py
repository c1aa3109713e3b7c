"""jsr's own model folder: ``config.json`` (the original diffusers/transformers config) + ``params/``, an Orbax
checkpoint of the Flax parameter tree (NHWC/HWIO layouts, Flax names).

Why a second format beside diffusers': an Orbax checkpoint restores straight into sharded device arrays on a
TPU pod (each host reads only its shards, no PyTorch-layout transposes on the host), and it is the format the
training checkpoints use. ``python -m jsr.weights to-jsr`` / ``to-diffusers`` convert whole SD folders.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jsr.weights import io

PARAMS_DIR = "params"


def is_native(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a jsr-format model (``params/`` Orbax checkpoint + ``config.json``)."""
    return (Path(folder) / PARAMS_DIR).is_dir() and (Path(folder) / "config.json").is_file()


def write_native(folder: str | os.PathLike, params: Any, config: Mapping) -> None:
    """Write ``params`` (any dtype) and ``config`` into ``folder`` in the jsr format; ``folder`` may exist but
    must not hold a ``params/`` checkpoint already."""
    folder = Path(folder).absolute()
    io.write_config(folder, config)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / PARAMS_DIR, params)
        ckpt.wait_until_finished()


def read_native(folder: str | os.PathLike, abstract_params: Any, *, model: str, dtype: Any = None,
                shardings: Any = None) -> Any:
    """Restore the parameter tree of a jsr-format ``folder``.

    Args:
      abstract_params: the module's abstract parameters (``jsr.models.common.abstract_params``); the checkpoint
        must have exactly this structure and these shapes.
      model: the model's name, for error messages.
      dtype: cast to this dtype after loading (default: as stored).
      shardings: optional tree of ``jax.sharding.Sharding`` to restore directly onto a mesh.
    Raises:
      jsr.weights.io.CorruptFileError: ``params/`` is not a readable Orbax checkpoint (one line naming it).
      jsr.weights.convert.CheckpointMismatchError: it holds other names or shapes than the model's.
    """
    folder = Path(folder).absolute()
    ckpt_dir = folder / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckpt:
        with _orbax_errors(ckpt_dir, "metadata"):
            meta = ckpt.metadata(ckpt_dir)
        stored = getattr(meta, "item_metadata", meta)
        stored = getattr(stored, "tree", stored)
        if stored is None:
            # Orbax reports a missing or damaged _METADATA / OCDBT manifest / data file by returning no tree.
            raise io.CorruptFileError(f"{ckpt_dir}: not a readable Orbax checkpoint (no parameter tree: its "
                                      "_METADATA, manifest.ocdbt or d/ files are missing or damaged)")
        _check_structure(stored, abstract_params, model, folder)
        target = jax.tree.map(
            lambda a, m, s=None: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=s),
            abstract_params, stored, *(() if shardings is None else (shardings,)))
        with _orbax_errors(ckpt_dir, "arrays"):
            params = ckpt.restore(ckpt_dir, target)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return params


@contextlib.contextmanager
def _orbax_errors(ckpt_dir: Path, part: str) -> Iterator[None]:
    """Orbax/TensorStore failures while reading ``ckpt_dir`` as one :class:`jsr.weights.io.CorruptFileError` line.

    A damaged checkpoint surfaces as whatever the storage layer raises (ValueError from TensorStore, FileNotFound,
    JSON errors, ...), often with a multi-line message that does not say which folder; ``part`` says what was being
    read (``metadata`` or ``arrays``).
    """
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the folder
        text = " ".join(str(e).split()) or "no detail"
        raise io.CorruptFileError(f"{ckpt_dir}: not a readable Orbax checkpoint (reading its {part}: "
                                  f"{type(e).__name__}: {text[:300]})") from None


def _check_structure(stored: Any, abstract: Any, model: str, folder: Path) -> None:
    from flax import traverse_util

    have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(_plain(stored)).items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(_plain(abstract)).items()}
    missing = sorted("/".join(k) for k in set(want) - set(have))
    unexpected = sorted("/".join(k) for k in set(have) - set(want))
    shapes = [f"{'/'.join(k)} has shape {have[k]} but the model expects {want[k]}"
              for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    problems = ([f"missing: {', '.join(missing[:12])}"] if missing else []) + \
               ([f"unexpected: {', '.join(unexpected[:12])}"] if unexpected else []) + shapes[:12]
    if problems:
        from jsr.weights.convert import CheckpointMismatchError

        raise CheckpointMismatchError(f"{model} checkpoint {folder} does not match the model config: "
                                      + "; ".join(problems))


def _plain(tree: Any) -> dict:
    return jax.tree_util.tree_map(lambda x: x, dict(tree)) if isinstance(tree, Mapping) else tree


def read_params(folder: str | os.PathLike, abstract: Any, indexed: frozenset, *, model: str, dtype: Any = None,
                **convert_kwargs) -> Any:
    """A component's parameters from ``folder`` in either format: jsr-native (Orbax ``params/``) or a
    diffusers/transformers safetensors/bin checkpoint converted by ``jsr.weights.convert.torch_state_to_params``
    (``indexed`` module lists, ``convert_kwargs`` such as ``rename``/``ignore``). ``model`` names it in errors."""
    from jsr.weights import convert

    if is_native(folder):
        return read_native(folder, abstract, model=model, dtype=dtype or jnp.float32)
    return convert.torch_state_to_params(io.read_state_dict(folder), abstract, indexed, model=f"{model} ({folder})",
                                         dtype=dtype, **convert_kwargs)
