"""PEFT-format LoRA checkpoints <-> jsr LoRA trees (``jsr.models.lora.LoRA``).

Reading (:func:`load_peft_lora`) accepts:

* **OSEDiff / PiSA-SR / FiDeSR release files** (``osediff.pkl``, ``pisa_sr.pkl``, FiDeSR's checkpoint:
  ``torch.save`` of a dict): per model a
  ``state_dict_<model>`` (``unet``, ``vae``) holding the peft-wrapped model's raw ``state_dict()`` entries
  (``down_blocks.0.resnets.0.conv1.lora_A.default_encoder.weight``; OSEDiff also the fully trained
  ``conv_in.base_layer.weight/bias``), the target lists ``<model>_lora_<group>_modules[_<suffix>]`` and the rank
  ``rank_<model>`` (OSEDiff) or ``lora_rank_<model>_<suffix>`` (PiSA-SR). Neither sets ``lora_alpha``, so peft's
  default 8 applies. OSEDiff's three UNet adapters ``default_encoder/decoder/others`` cover disjoint layers with one
  rank and alpha and become one LoRA ``"unet"`` (plus ``"vae"``); PiSA-SR's ``*_pix`` and ``*_sem`` adapters become
  ``"unet_pix"`` and ``"unet_sem"``. FiDeSR's file has OSEDiff's UNet layout (rank ``lora_rank_unet``, 8) plus an
  ``lrrb_state_dict``: :func:`load_release` returns the LoRAs and such other entries from one read. RCOD's file is
  OSEDiff's plus ``state_dict_proj`` (a ``Linear``'s plain state dict: ``load_release(..., raw=("proj",))``).
* **Plain peft/diffusers files**: ``adapter_model.safetensors`` (+ ``adapter_config.json``), diffusers'
  ``pytorch_lora_weights.safetensors`` (config in the file's ``lora_adapter_metadata``), or ``.bin``/``.pt``; keys
  in ``get_peft_model_state_dict`` form (``[base_model.model.]<module>.lora_A.weight``, optionally behind a
  pipeline prefix ``unet.``) or raw ``state_dict()`` form (``<module>.lora_A.<adapter>.weight``,
  ``<module>.base_layer.weight``). Such a LoRA is called ``"default"`` (or by its pipeline prefix / adapter name).

Fully trained tensors (``base_layer.*``, ``modules_to_save.<adapter>.*``, or plain ``<module>.weight/bias``) become
``LoRA.overrides``. Per-layer ranks are read from the factor shapes; peft's ``rank_pattern``/``alpha_pattern``/
``use_rslora`` are honoured by folding each layer's own ``scale_l`` into its ``b`` relative to the LoRA's
``alpha / rank`` (the product ``scale B A`` is exactly peft's). Unparseable keys, DoRA/bias LoRAs, a lone
``lora_A``/``lora_B`` and target lists that disagree with the tensors are errors that list them; with ``params``
given, every LoRA is also checked against the model (missing layers, shapes).

Writing (:func:`save_peft_lora`): ``adapter_model.safetensors`` in ``get_peft_model_state_dict`` form (float32,
unscaled factors, diffusers module names) with the adapter config both in ``adapter_config.json`` and in the file's
``lora_adapter_metadata`` header, so ``peft`` (``LoraConfig.from_pretrained`` + ``inject_adapter_in_model`` +
``set_peft_model_state_dict``, or ``PeftModel.from_pretrained``) and diffusers
(``unet.load_lora_adapter(folder, weight_name="adapter_model.safetensors", prefix=None)``) load it. peft cannot
express a LoRA layer whose base weight was replaced (OSEDiff's ``conv_in``): overrides go to
``base_overrides.safetensors`` (PyTorch names and layout) for ``model.load_state_dict(..., strict=False)`` before
the adapter is loaded. The merged alternative needs no peft at all:
``save_unet(module, jsr.models.lora.merge(params, lora), folder)``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jsr.models import lora as L
from jsr.weights import convert, io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OVERRIDES_WEIGHTS = "base_overrides.safetensors"
WEIGHT_NAMES = (ADAPTER_WEIGHTS, "pytorch_lora_weights.safetensors", "adapter_model.bin", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_adapter puts the LoraConfig in the header
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's default lora_alpha, which OSEDiff/PiSA-SR rely on
_OSEDIFF_GROUPS = ("encoder", "decoder", "others")
_PIPELINE_PREFIXES = ("unet", "vae", "text_encoder", "text_encoder_2", "transformer")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<leaf>weight|bias)$")
_SAVED_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<leaf>weight|bias)$")
_PLAIN_KEY = re.compile(r"^(?P<module>.+)\.(?P<leaf>weight|bias)$")


class PeftFormatError(ValueError):
    """A LoRA checkpoint jsr cannot read exactly: unknown keys, unpaired factors, unsupported peft options."""


# --------------------------------------------------------------------------------------------------------------
# Reading


def load_peft_lora(path: str | os.PathLike, rank: int | None = None, alpha: float | None = None, *,
                   params: Mapping[str, Any] | None = None) -> dict[str, L.LoRA]:
    """Read a PEFT-format LoRA checkpoint into jsr LoRA trees (see the module docstring for the layouts).

    Args:
      path: an OSEDiff/PiSA-SR ``.pkl``/``.pt``, a peft/diffusers ``.safetensors``/``.bin`` file, or a folder
        holding one (``adapter_model.safetensors``...) and its ``adapter_config.json``.
      rank: the nominal rank ``r`` (``scale = alpha / r``); default: the adapter config's ``r``, the release's
        ``rank_*`` entry, or the most common factor rank. It must be the rank of some layer's factors.
      alpha: default: the adapter config's ``lora_alpha``; for OSEDiff/PiSA-SR releases peft's default 8.
        Required for a bare state dict without any config.
      params: optional ``{model: params}`` (``"unet"``, ``"vae"``, ``"default"``...); each LoRA whose name is
        the model or starts with ``<model>_`` is checked against those parameters (layers exist, shapes fit).
    Returns:
      ``{name: LoRA}``: ``{"unet", "vae"}`` for OSEDiff, ``{"unet_pix", "unet_sem"}`` for PiSA-SR, ``{"default"}``
      for a plain adapter. Factors are float32 in jsr layouts (dense ``a`` [in, r]; conv ``a`` [kh, kw, in, r]).
    Raises:
      PeftFormatError listing unknown/unpaired keys; jsr.models.lora.LoRAMismatchError when ``params`` do not fit.
    """
    path = Path(path)
    file, config = _locate(path)
    obj = _read_any(file)
    if not _is_release(obj) and (file.parent / OVERRIDES_WEIGHTS).is_file() and file.name != OVERRIDES_WEIGHTS:
        obj = {**obj, **io.read_safetensors(file.parent / OVERRIDES_WEIGHTS)}  # written by save_peft_lora
    if _is_release(obj):
        loras = _from_release(obj, file, rank, alpha)
    else:
        if alpha is None and config is None:
            raise PeftFormatError(
                f"{file}: no adapter config found (no {ADAPTER_CONFIG} beside it, no {METADATA_KEY} in the file), "
                "so lora_alpha is unknown: pass alpha= (peft's LoraConfig default is 8; diffusers/kohya files "
                "without alphas mean alpha = rank)")
        loras = _from_state(obj, file, rank, alpha, config or {}, model=None)
    _check_params(loras, params, file)
    return loras


def load_release(path: str | os.PathLike, rank: int | None = None, alpha: float | None = None, *,
                 params: Mapping[str, Any] | None = None,
                 raw: Iterable[str] = ()) -> tuple[dict[str, L.LoRA], dict[str, Any]]:
    """A release ``torch.save`` dict (OSEDiff/PiSA-SR layout) read once: ``(loras, rest)``.

    ``loras`` are what :func:`load_peft_lora` returns for the file (same ``rank``/``alpha``/``params``
    handling); ``rest`` holds every other entry of the dict (target lists, ranks, and the method-specific ones
    such as FiDeSR's ``lrrb_state_dict``), tensors as numpy arrays, for the method that knows them. ``raw``
    names models whose ``state_dict_<model>`` is a plain module's state dict, not LoRA tensors (RCOD's
    ``state_dict_proj``): those entries are left in ``rest`` as they are.

    Raises:
      PeftFormatError if the file is not such a dict (no ``state_dict_<model>`` entry), or as load_peft_lora.
    """
    file = Path(path)
    obj = _read_any(file)
    if not _is_release(obj):
        raise PeftFormatError(f"{file}: not a release checkpoint (a torch.save dict with state_dict_<model> "
                              "entries)")
    plain = {f"state_dict_{m}" for m in raw}
    loras = _from_release({k: v for k, v in obj.items() if k not in plain}, file, rank, alpha)
    _check_params(loras, params, file)
    rest = {k: v for k, v in obj.items()
            if k in plain or not (isinstance(k, str) and k.startswith("state_dict_"))}
    return loras, rest


def read_release(path: str | os.PathLike) -> dict[str, Any]:
    """A release ``torch.save`` dict read as is (tensors as numpy arrays), for a method whose file needs
    renaming before :func:`release_loras` parses it (CODSR's ``*_default``/``*_sam`` target lists).

    Raises PeftFormatError when the file is not such a dict (no ``state_dict_<model>`` entry)."""
    file = Path(path)
    obj = _read_any(file)
    if not _is_release(obj):
        raise PeftFormatError(f"{file}: not a release checkpoint (a torch.save dict with state_dict_<model> "
                              "entries)")
    return dict(obj)


def release_loras(obj: Mapping[str, Any], file: str | os.PathLike, rank: int | None = None,
                  alpha: float | None = None, *, params: Mapping[str, Any] | None = None) -> dict[str, L.LoRA]:
    """The LoRAs of a release dict in memory (:func:`read_release`, possibly edited), as :func:`load_release`
    reads them from a file; ``file`` only names it in errors."""
    loras = _from_release(obj, Path(file), rank, alpha)
    _check_params(loras, params, Path(file))
    return loras


def _check_params(loras: Mapping[str, L.LoRA], params: Mapping[str, Any] | None, file: Path) -> None:
    """Each LoRA named ``<model>`` or ``<model>_*`` must fit ``params[model]``."""
    if params is None:
        return
    for name, lora in loras.items():
        model = next((m for m in sorted(params, key=len, reverse=True)
                      if name == m or name.startswith(m + "_")), None)
        if model is not None:
            try:
                L.check(lora, params[model])
            except L.LoRAMismatchError as e:
                raise L.LoRAMismatchError(f"{file}: LoRA {name!r}: {e}") from None


def _locate(path: Path) -> tuple[Path, dict | None]:
    """The weights file and its adapter config (dict or None)."""
    if path.is_dir():
        file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{path}: no LoRA weights (looked for {', '.join(WEIGHT_NAMES)})")
    elif path.is_file():
        file = path
    else:
        raise FileNotFoundError(f"{path}: no such LoRA file or folder")
    config = None
    if (file.parent / ADAPTER_CONFIG).is_file():
        config = io.read_json(file.parent / ADAPTER_CONFIG, "adapter config")
        if not isinstance(config, dict):
            raise io.CorruptFileError(f"{file.parent / ADAPTER_CONFIG}: adapter config is a JSON "
                                      f"{type(config).__name__}, not an object")
    elif file.suffix == ".safetensors":
        meta = _safetensors_metadata(file).get(METADATA_KEY)
        if meta:
            try:
                config = json.loads(meta)
            except json.JSONDecodeError as e:
                raise io.CorruptFileError(f"{file}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    return file, config


def _safetensors_metadata(path: Path) -> dict[str, str]:
    # The validated header (io.read_safetensors_header): a damaged file fails here with its one-line message.
    header, _ = io.read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _read_any(file: Path) -> Any:
    if file.suffix == ".safetensors":
        return io.read_safetensors(file)
    if file.suffix not in (".pkl", ".pt", ".pth", ".bin", ".ckpt"):
        raise PeftFormatError(f"{file}: unknown LoRA file type {file.suffix!r} (want .safetensors, .pkl, .pt, .bin)")
    try:
        import torch  # noqa: F401 - only to say what is missing
    except ImportError:
        raise ImportError(f"{file} is a PyTorch pickle; reading it needs torch (pip install 'jsr[torch]')") from None
    return _numpy_tree(io.torch_load(file))


def _numpy_tree(obj: Any) -> Any:
    if hasattr(obj, "detach"):
        return io._torch_to_numpy(obj)
    if isinstance(obj, Mapping):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    return obj


def _is_release(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(k, str) and k.startswith("state_dict_")
                                            and isinstance(v, Mapping) for k, v in obj.items())


def _from_release(obj: Mapping, file: Path, rank: int | None, alpha: float | None) -> dict[str, L.LoRA]:
    """OSEDiff/PiSA-SR ``torch.save`` dicts: one raw state dict per model, target lists, ranks."""
    out: dict[str, L.LoRA] = {}
    for key, state in obj.items():
        if not (isinstance(key, str) and key.startswith("state_dict_") and isinstance(state, Mapping)):
            continue
        model = key[len("state_dict_"):]
        if not state:
            continue
        _check_release_lists(obj, model, state, file)
        ranks = {k[len(f"lora_rank_{model}_"):]: int(v) for k, v in obj.items()
                 if isinstance(k, str) and k.startswith(f"lora_rank_{model}_")}
        base_rank = obj.get(f"rank_{model}", obj.get(f"lora_rank_{model}"))
        loras = _from_state(state, file, rank, alpha if alpha is not None else PEFT_DEFAULT_ALPHA, {}, model=model,
                            suffix_ranks=ranks, base_rank=None if base_rank is None else int(base_rank))
        clash = set(loras) & set(out)
        if clash:
            raise PeftFormatError(f"{file}: LoRA name(s) {sorted(clash)} produced by two state dicts")
        out.update(loras)
    return out


def _check_release_lists(obj: Mapping, model: str, state: Mapping, file: Path) -> None:
    """The release's ``<model>_lora_<group>_modules[_<suffix>]`` lists must name exactly the layers with factors."""
    have: dict[str, set[str]] = collections.defaultdict(set)
    for k in state:
        m = _LORA_KEY.match(k)
        if m and m["adapter"]:
            have[m["adapter"]].add(m["module"])
    problems = []
    for k, listed in obj.items():
        g = re.fullmatch(rf"{re.escape(model)}_lora_({'|'.join(_OSEDIFF_GROUPS)})_modules(?:_(.+))?", str(k))
        if not g or not isinstance(listed, (list, tuple)):
            continue
        adapter = f"default_{g[1]}" + (f"_{g[2]}" if g[2] else "")
        listed = set(listed)
        if adapter not in have and not listed:
            continue
        missing, extra = sorted(listed - have[adapter]), sorted(have[adapter] - listed)
        if missing:
            problems.append(f"{k} lists {len(missing)} module(s) without weights for adapter {adapter}: "
                            + convert._listing(missing))
        if extra:
            problems.append(f"adapter {adapter} has weights for {len(extra)} module(s) not in {k}: "
                            + convert._listing(extra))
    if problems:
        raise PeftFormatError(f"{file}: state_dict_{model} disagrees with its target lists: " + "; ".join(problems))


def _lora_name(model: str | None, adapter: str | None) -> str:
    """OSEDiff's ``default_<group>[_<suffix>]`` adapters collapse into ``<model>[_<suffix>]``."""
    if adapter is None or adapter == "default":
        suffix = None
    else:
        m = re.fullmatch(rf"default_(?:{'|'.join(_OSEDIFF_GROUPS)})(?:_(.+))?", adapter)
        suffix = m[1] if m else adapter
    if model is None:
        return suffix or "default"
    return f"{model}_{suffix}" if suffix else model


def _strip_prefix(state: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    keys = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    for p in _PIPELINE_PREFIXES:
        if keys and all(k.startswith(p + ".") for k in keys):
            return {k[len(p) + 1:]: v for k, v in keys.items()}, p
    return keys, None


def _from_state(state: Mapping[str, Any], file: Path, rank: int | None, alpha: float | None, config: Mapping,
                model: str | None, suffix_ranks: Mapping[str, int] | None = None,
                base_rank: int | None = None) -> dict[str, L.LoRA]:
    """One PEFT state dict (any key form) -> ``{name: LoRA}``."""
    for bad, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(bad):
            raise PeftFormatError(f"{file}: the adapter uses {why} ({bad}=true), which jsr LoRA does not implement")
    state, prefix = _strip_prefix(state)
    model = model or prefix
    factors: dict[str, dict[str, dict[str, np.ndarray]]] = collections.defaultdict(dict)  # name -> module -> a/b
    overrides: dict[str, np.ndarray] = {}  # "module.leaf" -> tensor
    unknown = []
    for key, value in state.items():
        if m := _LORA_KEY.match(key):
            name = _lora_name(model, m["adapter"])
            node = factors[name].setdefault(m["module"], {})
            ab = "a" if m["ab"] == "A" else "b"
            if ab in node:
                raise PeftFormatError(f"{file}: two lora_{m['ab']} tensors for {m['module']} in LoRA {name!r} "
                                      "(adapters of one LoRA must touch disjoint layers)")
            node[ab] = np.asarray(value)
        elif (m := _BASE_KEY.match(key)) or (m := _SAVED_KEY.match(key)):
            overrides[f"{m['module']}.{m['leaf']}"] = np.asarray(value)
        elif ".original_module." in key:
            continue  # peft's untouched copy of a modules_to_save layer: the base itself
        elif (m := _PLAIN_KEY.match(key)) and ".lora_" not in key:
            overrides[key] = np.asarray(value)
        else:
            unknown.append(key)
    unpaired = sorted(f"{n}:{mod}" for n, mods in factors.items() for mod, ab in mods.items() if len(ab) != 2)
    if unknown or unpaired:
        msg = []
        if unknown:
            msg.append(f"{len(unknown)} key(s) that are neither LoRA factors nor parameters (DoRA magnitudes, "
                       f"LoRA biases, kohya alphas and embeddings are not supported): {convert._listing(sorted(unknown))}")
        if unpaired:
            msg.append(f"{len(unpaired)} layer(s) with only one of lora_A/lora_B: {convert._listing(unpaired)}")
        raise PeftFormatError(f"{file}: " + "; ".join(msg))
    if not factors and not overrides:
        raise PeftFormatError(f"{file}: no LoRA tensors found")

    loras = {}
    for name, mods in sorted(factors.items()):
        suffix = name[len(model) + 1:] if model and name.startswith(model + "_") else None
        nominal = rank or (suffix_ranks or {}).get(suffix or "") or config.get("r") or base_rank
        loras[name] = _build(mods, file, name, nominal, alpha if alpha is not None else config.get("lora_alpha"),
                             config)
    if overrides:
        # Fully trained tensors are adapter-independent; give them to the model's only LoRA, else keep them apart
        # (stacking that entry with weight 1 applies them) so two LoRAs never both carry them.
        ov = _overrides_tree(overrides, file)
        owner = [n for n in loras] if len(loras) == 1 else []
        if owner:
            loras[owner[0]] = loras[owner[0]].replace(overrides=ov)
        else:
            base_name = f"{model or 'default'}_base" if loras else (model or "default")
            r = int(rank or config.get("r") or base_rank or 1)
            loras[base_name] = L.LoRA(factors={}, overrides=ov, rank=r,
                                      alpha=float(alpha if alpha is not None else config.get("lora_alpha", r)))
    return loras


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """peft's rank/alpha pattern lookup: the first key that matches the end of ``module`` at a dot boundary."""
    for k, v in patterns.items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return None


def _build(mods: Mapping[str, Mapping[str, np.ndarray]], file: Path, name: str, rank: int | None,
           alpha: float | None, config: Mapping) -> L.LoRA:
    if alpha is None:
        raise PeftFormatError(f"{file}: LoRA {name!r}: lora_alpha unknown; pass alpha=")
    layer_rank = {m: int(ab["a"].shape[0]) for m, ab in mods.items()}  # torch lora_A: [r, in(, kh, kw)]
    if rank is None:
        rank = collections.Counter(layer_rank.values()).most_common(1)[0][0]
    rank = int(rank)
    if rank not in set(layer_rank.values()):
        raise PeftFormatError(f"{file}: LoRA {name!r}: rank {rank} given, but the factors have rank(s) "
                              f"{sorted(set(layer_rank.values()))}")
    rslora = bool(config.get("use_rslora"))
    # jsr's scale is alpha/rank; an rsLoRA scale alpha/sqrt(r) is the same with alpha' = alpha * sqrt(r).
    alpha_eff = float(alpha) * (math.sqrt(rank) if rslora else 1.0)
    scale = alpha_eff / rank
    alpha_pattern = config.get("alpha_pattern") or {}
    factors = {}
    for module, ab in mods.items():
        a_t, b_t = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        r = layer_rank[module]
        if b_t.shape[1] != r:
            raise PeftFormatError(f"{file}: {module}: lora_A has rank {r} but lora_B has shape {b_t.shape}")
        a_l = _pattern_value(alpha_pattern, module)
        a_l = float(alpha if a_l is None else a_l)
        s_l = a_l / (math.sqrt(r) if rslora else r)
        a = convert.to_flax_layout("a", a_t, a_t.shape)
        b = convert.to_flax_layout("b", b_t, b_t.shape)
        if a.ndim == 4 and b.ndim == 2:  # a Linear B beside a conv A cannot come from peft
            raise PeftFormatError(f"{file}: {module}: conv lora_A {a_t.shape} with linear lora_B {b_t.shape}")
        if s_l != scale:
            b = b * np.float32(s_l / scale)
        factors[L.flax_path(module)] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    tree: dict = {}
    for path, node in factors.items():
        d = tree
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = node
    return L.LoRA(factors=tree, overrides={}, rank=rank, alpha=alpha_eff)


def _overrides_tree(overrides: Mapping[str, np.ndarray], file: Path) -> dict:
    flat = {}
    for key, v in overrides.items():
        module, leaf = key.rsplit(".", 1)
        v = np.asarray(v, np.float32)
        if leaf == "bias":
            flax_leaf = "bias"
        elif v.ndim in (2, 4):
            flax_leaf = "kernel"
        elif v.ndim == 1:
            flax_leaf = "scale"  # a norm's weight
        else:
            raise PeftFormatError(f"{file}: fully trained tensor {key} has shape {v.shape}, which jsr cannot place")
        flat[L.flax_path(module) + (flax_leaf,)] = jnp.asarray(convert.to_flax_layout(flax_leaf, v, v.shape))
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------------------
# Writing


def default_indexed() -> frozenset[str]:
    """List-container names of every jsr model a LoRA may target (UNet, VAE), for Flax -> PyTorch names."""
    names: set[str] = set()
    for mod, attr in (("jsr.weights.unet", "UNET_INDEXED"), ("jsr.weights.vae", "VAE_INDEXED")):
        try:
            names |= set(getattr(__import__(mod, fromlist=[attr]), attr))
        except ImportError:
            continue
    return frozenset(names)


def peft_state_dict(lora: L.LoRA, indexed: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """``(state, config)``: the LoRA in ``get_peft_model_state_dict`` form (float32, PyTorch layout, unscaled) and
    a ``peft.LoraConfig`` dict (``r``, ``lora_alpha``, exact ``target_modules``, ``rank_pattern`` for layers whose
    rank differs from ``r``)."""
    indexed = default_indexed() if indexed is None else frozenset(indexed)
    state: dict[str, np.ndarray] = {}
    modules, rank_pattern = [], {}
    for path in lora.paths():
        node = L._get(lora.factors, path)
        name = L.module_name(path, indexed)
        modules.append(name)
        a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
        state[f"{name}.lora_A.weight"] = np.ascontiguousarray(convert.to_torch_layout("a", a))
        state[f"{name}.lora_B.weight"] = np.ascontiguousarray(convert.to_torch_layout("b", b))
        if a.shape[-1] != lora.rank:
            rank_pattern["^" + re.escape(name)] = int(a.shape[-1])
    config = {
        "peft_type": "LORA", "r": int(lora.rank), "lora_alpha": float(lora.alpha), "target_modules": modules,
        "rank_pattern": rank_pattern, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": "gaussian",
        "modules_to_save": None, "task_type": None, "inference_mode": True,
    }
    return state, config


def overrides_state_dict(lora: L.LoRA, indexed: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The LoRA's fully trained tensors as a PyTorch state dict (float32, PyTorch names and layouts)."""
    indexed = default_indexed() if indexed is None else frozenset(indexed)
    if not lora.overrides:
        return {}
    return convert.params_to_torch_state(
        {k: v for k, v in _np_tree(lora.overrides).items()}, indexed)


def _np_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _np_tree(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def save_peft_lora(lora: L.LoRA, path: str | os.PathLike, *, indexed: Iterable[str] | None = None,
                   prefix: str | None = None) -> Path:
    """Write ``lora`` for peft/diffusers (see the module docstring for how to load it in PyTorch).

    Args:
      path: a folder (gets ``adapter_model.safetensors`` + ``adapter_config.json`` [+ ``base_overrides.safetensors``])
        or a ``.safetensors`` file name (the config and overrides go beside it).
      indexed: the model's list-container names for Flax -> PyTorch names (default: UNet's and VAE's).
      prefix: prepend ``<prefix>.`` to every key (e.g. ``"unet"`` for ``pipeline.load_lora_weights``).
    Returns:
      the safetensors file written.
    """
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / ADAPTER_WEIGHTS
    file.parent.mkdir(parents=True, exist_ok=True)
    state, config = peft_state_dict(lora, indexed)
    if prefix:
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    if not state:
        raise ValueError("save_peft_lora: the LoRA has no factors")
    io.write_safetensors(file, state, metadata={"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)})
    (file.parent / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    ov = overrides_state_dict(lora, indexed)
    if ov:
        if prefix:
            ov = {f"{prefix}.{k}": v for k, v in ov.items()}
        io.write_safetensors(file.parent / OVERRIDES_WEIGHTS, ov, metadata={"format": "pt"})
    return file
