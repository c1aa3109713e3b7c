"""Exported models in and out: the one reader of everything a user passes as ``--lora``.

Layout written at the end of training (``<workdir>/export/``)::

    export/<group>/jsr_export.json            the manifest (below)
    export/<group>/<name>/                    a LoRA: peft folder (adapter_model.safetensors + adapter_config.json
                                              [+ base_overrides.safetensors]); or a module: model.safetensors
                                              (PyTorch names/layouts) + config.json

The manifest (``format: jsr-export-1``) records the method, each tree's role at inference and kind, the knob
defaults the training implies (CTSR's ``t_scale``), the trees the model needs but did not train (``requires``:
CTSR stage 2's stage-1 export) and the base model it was trained on (folder name, parameter counts, a
fingerprint), so ``python -m jsr.infer --lora DIR`` picks the method and warns on another base with no flags.

:func:`read_source` reads, in this order: a folder with a manifest; a folder of such folders (``export/``);
a manifest-less jsr export of an older version (``unet/``, ``vae/`` peft folders); a method's public release file
(each registered method's :meth:`~jsr.methods.api.Method.import_release` is asked); any peft/diffusers LoRA file
or folder, or an OSEDiff/PiSA-SR ``.pkl`` (named LoRAs take their roles: ``unet``, ``vae``, ``unet_pix`` ->
``pix``, ``unet_sem`` -> ``sem``; an unnamed one the UNet or VAE role it fits).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from jsr.methods import registry
from jsr.methods.api import TrainSetup
from jsr.models import lora as L

MANIFEST = "jsr_export.json"
FORMAT = "jsr-export-1"
MODULE_WEIGHTS = "model.safetensors"
MODULE_CONFIG = "config.json"
# LoRA names in release files and plain peft files -> inference roles.
NAMED_ROLES = {"unet": "unet", "vae": "vae", "unet_pix": "pix", "unet_sem": "sem"}


@dataclasses.dataclass
class Source:
    """What one ``--lora`` path holds.

    Attributes:
      path: where it was read from.
      method: the method its manifest or release format names (``None``: a plain LoRA, method unknown).
      roles: ``{role: tree}`` (LoRAs or module parameter trees).
      knobs: knob defaults recorded by the export.
      base: the manifest's base-model record (``None`` without a manifest).
      requires: ``{role: path}`` of trees the model needs and did not train.
    """

    path: Path
    method: str | None
    roles: dict[str, Any]
    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: dict[str, Any] | None = None
    requires: dict[str, str] = dataclasses.field(default_factory=dict)


def base_record(base: Any) -> dict[str, Any]:
    """The base model as a manifest records it: folder name, UNet/VAE parameter counts and a fingerprint
    (SHA-256 of every tensor's path and shape plus the bytes of ``conv_in`` and ``conv_out``: cheap, and
    different for any other checkpoint in practice)."""
    h = hashlib.sha256()
    counts = {}
    for model, params in (("unet", base.unet_params), ("vae", base.vae_params)):
        flat = traverse_util.flatten_dict(params)
        counts[model] = int(sum(np.prod(v.shape) for v in flat.values()))
        for path in sorted(flat):
            h.update(f"{model}/{'/'.join(path)}:{tuple(flat[path].shape)};".encode())
        for key in ("conv_in", "conv_out"):
            if key in params and "kernel" in params[key]:
                h.update(np.asarray(jax.device_get(params[key]["kernel"]), np.float32).tobytes())
    return {"name": Path(base.path).name, "unet_params": counts["unet"], "vae_params": counts["vae"],
            "fingerprint": h.hexdigest()[:16], "random_weights": bool(base.random_weights)}


def check_base(source: Source, base: Any, log=logging.warning) -> bool:
    """Warn (through ``log``) when ``source`` was trained on another base than ``base``; True when it matches or
    nothing is recorded."""
    if not source.base:
        return True
    have = base_record(base)
    if source.base.get("fingerprint") == have["fingerprint"]:
        return True
    log(f"{source.path}: trained on base {source.base.get('name')!r} ({source.base.get('unet_params'):,} UNet "
        f"parameters, fingerprint {source.base.get('fingerprint')}), but the loaded base is {have['name']!r} "
        f"({have['unet_params']:,}, {have['fingerprint']}): results may be meaningless")
    return False


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_export(folder: str | os.PathLike, method: str, setup: TrainSetup, params: Mapping[str, Any],
                 base: Any) -> list[Path]:
    """Write every group of ``setup.export`` from trained ``params`` (``{group: {name: tree}}``, host arrays)
    under ``folder/<group>/``, each with its manifest. Returns the written weight files."""
    from jsr.weights.peft import save_peft_lora

    folder = Path(folder)
    record = base_record(base)
    written = []
    for group, entries in setup.export.items():
        gdir = folder / group
        trees = {}
        for name, entry in entries.items():
            tree = params[group][name]
            if isinstance(tree, L.LoRA):
                written.append(save_peft_lora(tree, gdir / name))
                model = "unet" if _fits(tree, base.unet_params) else "vae"
                trees[name] = {"role": entry.role, "kind": "lora", "model": model}
            else:
                if entry.config is None:
                    raise ValueError(f"method {method}: export entry {group}/{name} is a module and needs a config")
                written.append(save_module(tree, gdir / name, entry.config))
                trees[name] = {"role": entry.role, "kind": "module"}
        manifest = {"format": FORMAT, "method": method, "group": group, "trees": trees,
                    "knobs": dict(setup.knob_defaults), "requires": dict(setup.requires), "base": record}
        _write_json(gdir / MANIFEST, manifest)
    return written


def save_module(params: Mapping[str, Any], folder: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """A non-LoRA module: ``model.safetensors`` (float32, PyTorch names and layouts: ``conv.weight`` [O, I, kh, kw])
    plus ``config.json`` (``config``). Returns the weights file."""
    from jsr.weights import convert, io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    state = convert.params_to_torch_state(host, config.get("indexed", ()))
    file = folder / MODULE_WEIGHTS
    io.write_safetensors(file, state, metadata={"format": "pt"})
    _write_json(folder / MODULE_CONFIG, dict(config))
    return file


def load_module(folder: str | os.PathLike, template: Any) -> tuple[dict, dict]:
    """``(params, config)`` of a module folder written by :func:`save_module`; ``template`` is a callable
    ``config -> abstract params`` (the method's ``module_template``)."""
    from jsr.weights import convert, io

    folder = Path(folder)
    config = io.read_config(folder)
    state = io.read_safetensors(folder / MODULE_WEIGHTS)
    params = convert.torch_state_to_params(state, template(config), config.get("indexed", ()), model=str(folder))
    return params, config


def _write_json(path: Path, obj: Any) -> None:
    from jsr.weights.io import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_source(path: str | os.PathLike, base: Any) -> Source:
    """Everything ``path`` holds as a :class:`Source` (see the module docstring for what is recognised).

    LoRAs are checked against the base they act on (:class:`jsr.models.lora.LoRAMismatchError` names the file
    and layers). Raises FileNotFoundError for a missing path, ValueError for a folder jsr cannot read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / MANIFEST).is_file():
        return _read_manifest_folder(path, base)
    if path.is_dir():
        groups = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
        if groups:
            return merge_sources([_read_manifest_folder(p, base) for p in groups], where=str(path))
        if any((path / m).is_dir() for m in ("unet", "vae")):
            return Source(path, None, _legacy_export(path, base))
    for name in registry.names():
        roles = registry.get(name).import_release(path, base)
        if isinstance(roles, Source):  # a release that also sets knob defaults
            return roles
        if roles is not None:
            return Source(path, name, roles)
    return Source(path, None, _plain_loras(path, base))


def read_role(path: str | os.PathLike, role: str, base: Any) -> Source:
    """``ROLE=PATH`` on a command line: ``path`` must hold one tree, which takes ``role``."""
    src = read_source(path, base)
    if len(src.roles) != 1:
        raise ValueError(f"{path}: the {role} tree must be one tree, found {sorted(src.roles)}")
    tree = next(iter(src.roles.values()))
    if isinstance(tree, L.LoRA) and not _fits(tree, base.unet_params):
        raise L.LoRAMismatchError(f"{path}: the {role} LoRA does not fit the base model's UNet")
    return dataclasses.replace(src, roles={role: tree})


def merge_sources(sources: list[Source], where: str = "") -> Source:
    """One :class:`Source` from several (their roles must not collide; their methods must agree)."""
    roles: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    methods = {s.method for s in sources if s.method is not None}
    if len(methods) > 1:
        raise ValueError(f"{where or 'the given models'}: exports of different methods ({', '.join(sorted(methods))})"
                         "; pass --method to say which one to run")
    knobs: dict[str, Any] = {}
    requires: dict[str, str] = {}
    for s in sources:
        for role, tree in s.roles.items():
            if role in roles:
                raise ValueError(f"two trees for the {role} role: one from {origin[role]}, one from {s.path}")
            roles[role], origin[role] = tree, s.path
        knobs.update(s.knobs)
        requires.update(s.requires)
    bases = [s.base for s in sources if s.base]
    return Source(Path(where) if where else sources[0].path, next(iter(methods), None), roles, knobs,
                  bases[0] if bases else None, {r: p for r, p in requires.items() if r not in roles})


def _read_manifest_folder(folder: Path, base: Any) -> Source:
    from jsr.weights.peft import load_peft_lora

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / MANIFEST}: not a readable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, jsr reads {FORMAT!r}")
    method = manifest["method"]
    roles: dict[str, Any] = {}
    for name, info in manifest["trees"].items():
        role = info["role"]
        if info["kind"] == "lora":
            lo = next(iter(load_peft_lora(folder / name).values()))
            _check(lo, base.vae_params if info.get("model") == "vae" else base.unet_params, folder / name, role)
            roles[role] = lo
        else:
            m = registry.get(method)
            roles[role], _ = load_module(folder / name, lambda cfg: m.module_template(role, cfg, base))
    return Source(folder, method, roles, dict(manifest.get("knobs", {})), manifest.get("base"),
                  dict(manifest.get("requires", {})))


def _legacy_export(path: Path, base: Any) -> dict[str, Any]:
    from jsr.weights.peft import load_peft_lora

    out = {}
    for model in ("unet", "vae"):
        if (path / model).is_dir():
            found = load_peft_lora(path / model)
            if len(found) != 1:
                raise ValueError(f"{path / model}: expected one LoRA, found {sorted(found)}")
            lo = next(iter(found.values()))
            _check(lo, base.unet_params if model == "unet" else base.vae_params, path / model, model)
            out[model] = lo
    return out


def _plain_loras(path: Path, base: Any) -> dict[str, Any]:
    from jsr.weights.peft import load_peft_lora

    out = {}
    for name, lo in load_peft_lora(path).items():
        role = NAMED_ROLES.get(name)
        if role is None:
            role = "unet" if _fits(lo, base.unet_params) else "vae" if _fits(lo, base.vae_params) else None
        if role is None:
            raise L.LoRAMismatchError(f"{path}: LoRA {name!r} fits neither the UNet nor the VAE of the base model "
                                      "(another base model or architecture?)")
        _check(lo, base.vae_params if role == "vae" else base.unet_params, path, role)
        if role in out:
            raise ValueError(f"{path}: two LoRAs for the {role} role")
        out[role] = lo
    return out


def _fits(lora: L.LoRA, params: Any) -> bool:
    try:
        L.check(lora, params)
        return True
    except L.LoRAMismatchError:
        return False


def _check(lora: L.LoRA, params: Any, where: Path, role: str) -> None:
    try:
        L.check(lora, params)
    except L.LoRAMismatchError as e:
        raise L.LoRAMismatchError(f"{where}: the {role} LoRA does not fit the base model: {e}") from None
