"""Optional bridge to `pyiqa` (IQA-PyTorch) for the learned no-reference metrics of the SR tables.

========  ==================  ====================================================  ===========================
jsr name  pyiqa metric        weights pyiqa needs (under ``torch.hub.get_dir()``)    range (higher is better)
========  ==================  ====================================================  ===========================
musiq     ``musiq`` (KonIQ)   ``pyiqa/musiq_koniq_ckpt-e95806b9.pth``               ~0..100
maniqa    ``maniqa-pipal``    ``pyiqa/MANIQA_PIPAL-ae6d356b.pth`` (+ timm's          ~0..1
                              ``vit_base_patch8_224`` in the Hugging Face cache)
clipiqa   ``clipiqa``         ``clip/RN50.pt``                                       0..1
========  ==================  ====================================================  ===========================

MANIQA uses the PIPAL checkpoint, as the CTSR paper states. Nothing here downloads: jsr checks for the files
first, and while pyiqa builds a metric every download path it could take (``torch.hub``, ``urllib``, the
Hugging Face hub) is blocked, so a missing file is a :class:`MissingWeightsError` naming it rather than a hang or
a silent fetch. Copy the files from a machine where ``pyiqa.create_metric(name)`` has run once.

pyiqa is not a jsr dependency (it pins torchvision, timm, transformers and more); without it
:func:`available` is False and :func:`score` raises :class:`PyiqaUnavailableError`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np


class PyiqaUnavailableError(RuntimeError):
    """pyiqa (or torch) is not installed, or fails to import."""


class MissingWeightsError(FileNotFoundError):
    """A weights file pyiqa needs is not on disk (jsr never downloads)."""


class _Spec(NamedTuple):
    pyiqa_name: str
    files: tuple[tuple[str, str], ...]  # (sub-folder of torch.hub.get_dir(), file name)
    note: str = ""


METRICS: dict[str, _Spec] = {
    "musiq": _Spec("musiq", (("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),)),
    "maniqa": _Spec("maniqa-pipal", (("pyiqa", "MANIQA_PIPAL-ae6d356b.pth"),),
                    "MANIQA also builds timm's vit_base_patch8_224, whose ImageNet weights timm loads from the "
                    "Hugging Face cache (HF_HOME) before the PIPAL checkpoint replaces them"),
    "clipiqa": _Spec("clipiqa", (("clip", "RN50.pt"),)),
}

_CACHE: dict[tuple[int, str, str], Any] = {}


def _spec(name: str) -> _Spec:
    key = name.lower()
    if key not in METRICS:
        raise ValueError(f"unknown pyiqa metric {name!r}; jsr bridges {sorted(METRICS)}")
    return METRICS[key]


def hub_dir() -> Path:
    """Where pyiqa keeps weights: ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``)."""
    try:
        import torch.hub

        return Path(torch.hub.get_dir())
    except ImportError:  # the same rule as torch's, for the error message
        home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
        return Path(os.path.expanduser(home)) / "hub"


def required_files(name: str) -> list[Path]:
    """The weight files ``name`` needs, as absolute paths (whether or not they exist)."""
    root = hub_dir()
    return [root / sub / fname for sub, fname in _spec(name).files]


def _import_pyiqa():
    try:
        return importlib.import_module("pyiqa")
    except Exception as e:  # ImportError, or a broken dependency (torchvision built for another torch...)
        raise PyiqaUnavailableError(
            f"pyiqa is not usable here ({type(e).__name__}: {e}). MUSIQ, MANIQA and CLIPIQA come from it: "
            "`pip install pyiqa` next to a matching torch/torchvision, then place its weights files "
            "(see jsr.metrics.pyiqa_bridge.required_files).") from None


def available(name: str) -> bool:
    """True if ``name`` (``"musiq"``, ``"maniqa"``, ``"clipiqa"``) can be scored: pyiqa imports and the weights
    files are on disk. Unknown names raise ``ValueError``."""
    _spec(name)
    try:
        _import_pyiqa()
    except PyiqaUnavailableError:
        return False
    return all(p.is_file() for p in required_files(name))


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Turn every download pyiqa (or timm, CLIP) could start into a :class:`MissingWeightsError`."""
    import torch.hub

    def refuse(url, dst=None, *args, **kwargs):
        where = f" to {dst}" if isinstance(dst, (str, os.PathLike)) else ""
        raise MissingWeightsError(f"pyiqa tried to download {url}{where}; jsr does not download weights: put the "
                                  "file there by hand")

    def refuse_open(url, *args, **kwargs):
        refuse(getattr(url, "full_url", url))

    patches = [(torch.hub, "download_url_to_file", refuse), (urllib.request, "urlopen", refuse_open)]
    dl = sys.modules.get("pyiqa.utils.download_util")  # imported `download_url_to_file` by name
    if dl is not None and hasattr(dl, "download_url_to_file"):
        patches.append((dl, "download_url_to_file", refuse))
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    try:
        for mod, attr, fn in patches:
            setattr(mod, attr, fn)
        os.environ.update({k: "1" for k in saved_env})
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric(name: str, device: str):
    pyiqa = _import_pyiqa()
    spec = _spec(name)
    missing = [p for p in required_files(name) if not p.is_file()]
    extra = f" {spec.note}." if spec.note else ""
    if missing:
        raise MissingWeightsError(
            f"pyiqa metric {spec.pyiqa_name!r} needs weights that are not on disk: "
            f"{', '.join(str(p) for p in missing)}. jsr never downloads them; copy them there (torch.hub.get_dir()"
            f" = {hub_dir()}) from a machine where pyiqa.create_metric({spec.pyiqa_name!r}) has run.{extra}")
    key = (id(pyiqa), name.lower(), device)
    if key not in _CACHE:
        with _no_downloads():
            try:
                _CACHE[key] = pyiqa.create_metric(spec.pyiqa_name, device=device)
            except MissingWeightsError:
                raise
            except OSError as e:  # e.g. huggingface_hub's LocalEntryNotFoundError while offline
                raise MissingWeightsError(f"pyiqa metric {spec.pyiqa_name!r}: a weights file is missing from a "
                                          f"local cache ({type(e).__name__}: {e}).{extra}") from None
    return _CACHE[key]


def clear_cache() -> None:
    """Forget the pyiqa metric objects built so far (they hold their networks in memory)."""
    _CACHE.clear()


def score(name: str, images_nhwc_01: np.ndarray, *, device: str = "cpu", batch_size: int = 8) -> np.ndarray:
    """Score images with a pyiqa no-reference metric.

    Args:
      name: ``"musiq"``, ``"maniqa"`` (PIPAL weights) or ``"clipiqa"``.
      images_nhwc_01: [N, H, W, 3] (or one [H, W, 3]) RGB in [0, 1], NHWC, NumPy or JAX.
      device: torch device for pyiqa (``"cpu"``, ``"cuda"``).
      batch_size: images per pyiqa call (same-size images only, which a batch is).
    Returns:
      [N] float64 scores (a 0-d array for one image); see the module table for ranges. Higher is better.
    Raises:
      PyiqaUnavailableError without pyiqa; MissingWeightsError naming the file(s) to provide; ValueError on
      bad input.
    """
    x = np.asarray(images_nhwc_01, np.float32)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"pyiqa score: want [N, H, W, 3] or [H, W, 3] RGB images, got shape {x.shape}")
    if x.size and (x.min() < -1e-4 or x.max() > 1 + 1e-4):
        raise ValueError(f"pyiqa score: want images in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
    metric = _metric(name, device)
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], max(1, batch_size)):
            t = torch.from_numpy(np.ascontiguousarray(np.clip(x[i:i + batch_size], 0, 1).transpose(0, 3, 1, 2)))
            out.append(np.asarray(metric(t.to(device)).detach().cpu().numpy(), np.float64).reshape(-1))
    res = np.concatenate(out)
    if res.shape[0] != x.shape[0]:
        raise RuntimeError(f"pyiqa {name}: got {res.shape[0]} scores for {x.shape[0]} images")
    return res[0] if single else res
