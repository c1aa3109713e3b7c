"""Where the metric weight files are: the places PyTorch packages keep them, looked up before anyone is asked.

jsr never downloads. A PyTorch user usually has these files already, each where the package that fetched it put
it; this module looks there (nothing is imported to do so: a package's folder is found with
``importlib.util.find_spec``, which does not run it):

==============  =================================  ======================================================
file            used by                            looked for in (first found wins)
==============  =================================  ======================================================
``vgg16``       LPIPS, DISTS (the VGG16 trunk)     ``<torch hub>/checkpoints/vgg16-397923af.pth``
                                                   (torchvision's ImageNet weights)
``lpips``       LPIPS (linear heads)               the ``lpips`` package's ``weights/v0.1/vgg.pth``;
                                                   ``<torch hub>/pyiqa/LPIPS_v0.1_vgg-a78928a0.pth``
``dists``       DISTS (alpha, beta)                the ``DISTS_pytorch`` package's ``weights.pt``, then
                                                   ``<sys.prefix>/weights.pt`` (where its wheel installs
                                                   it); ``<torch hub>/pyiqa/DISTS_weights-f5e65c96.pth``
``inception``   FID                                ``<torch hub>/checkpoints/pt_inception-2015-12-05-
                                                   6726825d.pth`` (pytorch-fid's download)
``niqe``        NIQE (pristine model)              basicsr's ``basicsr/metrics/niqe_pris_params.npz``;
                                                   ``<torch hub>/pyiqa/niqe_modelparameters.mat``
``musiq``       MUSIQ (through pyiqa)              ``<torch hub>/pyiqa/musiq_koniq_ckpt-e95806b9.pth``
``maniqa``      MANIQA-PIPAL (through pyiqa)       ``<torch hub>/pyiqa/MANIQA_PIPAL-ae6d356b.pth``
``maniqa_vit``  MANIQA (timm's ViT-B/8 it builds)  ``<HF hub>/models--timm--vit_base_patch8_224.augreg2_
                                                   in21k_ft_in1k/snapshots/<rev>/model.safetensors``
``clip_rn50``   CLIPIQA (through pyiqa)            ``<torch hub>/clip/RN50.pt``
==============  =================================  ======================================================

``<torch hub>`` is torch's rule: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
``~/.cache/torch/hub`` (``torch.hub.get_dir()`` when torch is already imported); files that jsr reads itself are
also looked for in the other two of these. Files that pyiqa or timm read are looked for only where those
packages read them (torch's hub folder in use, the Hugging Face cache in use: ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``); a copy found in
another of these folders is reported with the variable to set.

A file found here is a candidate, not a promise: the metric's loader checks names and shapes when it reads it
(:func:`check_file` does the same per file for ``python -m jsr.metrics files --check``). Paths a user gives (flags,
config) always win over what is found here; that choice is the caller's (``jsr.eval.load_metrics``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

from jsr.metrics.inception import WEIGHTS_FILE as INCEPTION_FILE

VGG16_FILE = "vgg16-397923af.pth"
PYIQA_LPIPS_FILE = "LPIPS_v0.1_vgg-a78928a0.pth"
PYIQA_DISTS_FILE = "DISTS_weights-f5e65c96.pth"
PYIQA_NIQE_FILE = "niqe_modelparameters.mat"
TIMM_VIT_REPO = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
PYIQA_GET = "pip install pyiqa, then "


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One place a file may be.

    Attributes:
      path: the file's path there (``None``: the place does not exist here, e.g. a package that is not installed).
      note: what this place is (shown when listing).
      usable: False for a copy in a folder the reading package does not look in (``note`` says what to set).
    """

    path: Path | None
    note: str = ""
    usable: bool = True


@dataclasses.dataclass(frozen=True)
class Lookup:
    """The result of looking for one file: where it was looked for and what was found.

    Attributes:
      key: the file's key (``vgg16``, ``lpips``...; see the module table).
      title: what the file is, for people.
      candidates: every place looked in, in order.
      path: the first usable candidate that is a file (``None``: missing).
      get: the one command or instruction that puts the file where it is looked for.
    """

    key: str
    title: str
    candidates: tuple[Candidate, ...]
    path: Path | None
    get: str

    @property
    def found(self) -> bool:
        return self.path is not None

    @property
    def expected(self) -> Path | None:
        """Where the file would be used from: the found path, else the first usable candidate with a path."""
        if self.path is not None:
            return self.path
        return next((c.path for c in self.candidates if c.usable and c.path is not None), None)

    def elsewhere(self) -> list[Candidate]:
        """Copies that exist where the reading package does not look (each note says what to set)."""
        return [c for c in self.candidates if not c.usable and c.path is not None and c.path.is_file()]

    def hint(self) -> str:
        """What to do when the file is missing: a copy elsewhere and what to set, or :attr:`get`."""
        other = self.elsewhere()
        if other:
            return f"{other[0].path} exists but {other[0].note}"
        return self.get


# ---------------------------------------------------------------------------------------------------------------
# The folders packages keep files in


def _expand(p: str) -> Path:
    return Path(os.path.expanduser(p))


def _unique(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if all(os.path.normpath(p) != os.path.normpath(q) for q in out):
            out.append(p)
    return out


def torch_hub_dirs() -> list[Path]:
    """torch hub folders, the one torch uses first (``torch.hub.get_dir()``'s rule: ``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``), then the other ones of these that differ."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    default = _expand("~/.cache/torch/hub")
    if os.environ.get("TORCH_HOME"):
        active = _expand(os.environ["TORCH_HOME"]) / "hub"
    elif xdg:
        active = _expand(xdg) / "torch" / "hub"
    else:
        active = default
    torch = sys.modules.get("torch")
    hub = getattr(torch, "hub", None)
    if hub is not None and hasattr(hub, "get_dir"):  # honours torch.hub.set_dir() in this process
        active = Path(hub.get_dir())
    return _unique([active] + ([_expand(xdg) / "torch" / "hub"] if xdg else []) + [default])


def hf_hub_dir() -> Path:
    """The Hugging Face hub cache that ``huggingface_hub`` (so timm) reads: ``$HF_HUB_CACHE`` (or the older
    ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return _expand(os.environ[var])
    if os.environ.get("HF_HOME"):
        return _expand(os.environ["HF_HOME"]) / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return _expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return _expand("~/.cache/huggingface/hub")


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (``None``: not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed(name: str) -> bool:
    """Whether a top-level package is installed (found on ``sys.path``; not imported, so not proof it imports)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Where each file is looked for


def _hub_files(*parts: str) -> list[Candidate]:
    # Files jsr reads itself: any torch hub folder will do.
    return [Candidate(h.joinpath(*parts), "torch hub cache") for h in torch_hub_dirs()]


def _pyiqa_files(*parts: str) -> list[Candidate]:
    # Files pyiqa reads: only from the hub folder torch uses in this environment.
    hubs = torch_hub_dirs()
    out = [Candidate(hubs[0].joinpath(*parts), "torch hub cache (where pyiqa reads)")]
    for h in hubs[1:]:
        out.append(Candidate(h.joinpath(*parts), f"pyiqa reads {hubs[0]}: set TORCH_HOME={h.parent}", False))
    return out


def _package_file(package: str, *parts: str) -> Candidate:
    root = package_dir(package)
    if root is None:
        return Candidate(None, f"the {package} package's {'/'.join(parts)} ({package} is not installed)")
    return Candidate(root.joinpath(*parts), f"bundled with the {package} package")


def _vgg16() -> list[Candidate]:
    return _hub_files("checkpoints", VGG16_FILE)


def _lpips() -> list[Candidate]:
    return [_package_file("lpips", "weights", "v0.1", "vgg.pth")] + _hub_files("pyiqa", PYIQA_LPIPS_FILE)


def _dists() -> list[Candidate]:
    own = _package_file("DISTS_pytorch", "weights.pt")
    # DISTS_pytorch 0.1's wheel installs weights.pt into sys.prefix (a data file), which is where its code reads
    # it; only looked at when the package is there, since the name alone says little.
    prefix = [Candidate(Path(sys.prefix) / "weights.pt", "where the DISTS_pytorch wheel installs it (sys.prefix)")]
    return [own] + (prefix if own.path is not None else []) + _hub_files("pyiqa", PYIQA_DISTS_FILE)


def _inception() -> list[Candidate]:
    return _hub_files("checkpoints", INCEPTION_FILE)


def _niqe() -> list[Candidate]:
    return [_package_file("basicsr", "metrics", "niqe_pris_params.npz")] + _hub_files("pyiqa", PYIQA_NIQE_FILE)


def _timm_vit() -> list[Candidate]:
    hub = hf_hub_dir()
    repo = hub / ("models--" + TIMM_VIT_REPO.replace("/", "--"))
    names = ("model.safetensors", "pytorch_model.bin")
    ref = repo / "refs" / "main"
    revisions: list[str] = []
    if ref.is_file():  # the snapshot huggingface_hub resolves "main" to
        revisions.append(ref.read_text(encoding="utf-8").strip())
    if (repo / "snapshots").is_dir():
        revisions += sorted(p.name for p in (repo / "snapshots").iterdir() if p.name not in revisions)
    if not revisions:
        revisions = ["<revision>"]
    return [Candidate(repo / "snapshots" / r / n, "Hugging Face hub cache (where timm reads)")
            for r in revisions for n in names]


_Where = Callable[[], list[Candidate]]


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """A weight file a metric needs: its key, what it is (a sentence; a short name), where it is looked for, how
    to get it."""

    key: str
    title: str
    where: _Where
    get: str
    name: str


FILES: dict[str, FileSpec] = {s.key: s for s in (
    FileSpec("vgg16", f"torchvision's ImageNet VGG16 ({VGG16_FILE})", _vgg16,
             "python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\" "
             "(torchvision saves it in torch hub's cache)", VGG16_FILE),
    FileSpec("lpips", "LPIPS v0.1 linear heads for VGG (the lpips package's weights/v0.1/vgg.pth)", _lpips,
             "pip install --no-deps lpips (the package carries the file; jsr does not import it)", "lpips' vgg.pth"),
    FileSpec("dists", "DISTS alpha/beta weights (DISTS_pytorch's weights.pt)", _dists,
             "pip install --no-deps dists-pytorch (the package carries the file; jsr does not import it)",
             "DISTS' weights.pt"),
    FileSpec("inception", f"pytorch-fid's FID Inception-v3 ({INCEPTION_FILE})", _inception,
             "pip install pytorch-fid, then python -c \"from pytorch_fid.inception import fid_inception_v3; "
             "fid_inception_v3()\" (saves it in torch hub's cache)", INCEPTION_FILE),
    FileSpec("niqe", "NIQE pristine model (basicsr's niqe_pris_params.npz or pyiqa's niqe_modelparameters.mat)",
             _niqe, "pip install --no-deps basicsr (the package carries niqe_pris_params.npz), or with pyiqa: "
             "python -c \"import pyiqa; pyiqa.create_metric('niqe')\"",
             "niqe_pris_params.npz (or niqe_modelparameters.mat)"),
    FileSpec("musiq", "MUSIQ KonIQ checkpoint (musiq_koniq_ckpt-e95806b9.pth)", lambda: _pyiqa_files(
        "pyiqa", "musiq_koniq_ckpt-e95806b9.pth"), PYIQA_GET + "python -c \"import pyiqa; "
        "pyiqa.create_metric('musiq')\"", "musiq_koniq_ckpt-e95806b9.pth"),
    FileSpec("maniqa", "MANIQA PIPAL checkpoint (MANIQA_PIPAL-ae6d356b.pth)", lambda: _pyiqa_files(
        "pyiqa", "MANIQA_PIPAL-ae6d356b.pth"), PYIQA_GET + "python -c \"import pyiqa; "
        "pyiqa.create_metric('maniqa-pipal')\"", "MANIQA_PIPAL-ae6d356b.pth"),
    FileSpec("maniqa_vit", f"timm's ImageNet ViT-B/8 that MANIQA builds first ({TIMM_VIT_REPO})", _timm_vit,
             PYIQA_GET + "python -c \"import pyiqa; pyiqa.create_metric('maniqa-pipal')\" (timm saves it in the "
             "Hugging Face cache)", "timm's vit_base_patch8_224 weights"),
    FileSpec("clip_rn50", "OpenAI CLIP RN50 (RN50.pt) for CLIPIQA", lambda: _pyiqa_files("clip", "RN50.pt"),
             PYIQA_GET + "python -c \"import pyiqa; pyiqa.create_metric('clipiqa')\"", "RN50.pt"),
)}

# Each metric's files, in the order its loader takes them.
METRIC_FILES: dict[str, tuple[str, ...]] = {
    "lpips": ("vgg16", "lpips"), "dists": ("vgg16", "dists"), "fid": ("inception",), "niqe": ("niqe",),
    "musiq": ("musiq",), "maniqa": ("maniqa", "maniqa_vit"), "clipiqa": ("clip_rn50",),
}
METRIC_TITLES = {"lpips": "LPIPS", "dists": "DISTS", "fid": "FID", "niqe": "NIQE", "musiq": "MUSIQ",
                 "maniqa": "MANIQA", "clipiqa": "CLIPIQA"}
# Packages a metric runs through (not only files): checked for presence, never imported here.
METRIC_PACKAGES: dict[str, tuple[str, ...]] = {"musiq": ("pyiqa",), "maniqa": ("pyiqa",), "clipiqa": ("pyiqa",)}


def find(key: str) -> Lookup:
    """Look for one file (a key of :data:`FILES`) in every place it is kept; the first usable file wins."""
    if key not in FILES:
        raise ValueError(f"unknown metric weight file {key!r}; known: {', '.join(FILES)}")
    spec = FILES[key]
    cands = tuple(spec.where())
    path = next((c.path for c in cands if c.usable and c.path is not None and c.path.is_file()), None)
    return Lookup(key, spec.title, cands, path, spec.get)


def _check_metric(metric: str) -> str:
    key = metric.lower()
    if key not in METRIC_FILES:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_FILES)}")
    return key


def metric_lookups(metric: str) -> list[Lookup]:
    """The lookups of every file ``metric`` (``lpips``, ``dists``, ``fid``, ``niqe``, ``musiq``, ``maniqa``,
    ``clipiqa``) needs, in the order its loader takes them."""
    return [find(k) for k in METRIC_FILES[_check_metric(metric)]]


def missing_packages(metric: str) -> list[str]:
    """Packages ``metric`` runs through that are not installed (pyiqa for MUSIQ, MANIQA, CLIPIQA)."""
    return [p for p in METRIC_PACKAGES.get(_check_metric(metric), ()) if not installed(p)]


def discover(metric: str) -> list[Path] | None:
    """Every file ``metric`` needs, as found (in its loader's order), or ``None`` if any is missing."""
    looks = metric_lookups(metric)
    return [lk.path for lk in looks] if all(lk.found for lk in looks) else None


def why_missing(metric: str, looks: list[Lookup] | None = None, *, how: bool = False) -> str:
    """One line: which of ``metric``'s packages and files are missing (``""``: none), e.g. ``vgg16-397923af.pth
    not found``; with ``how``, the command that gets the first missing one follows."""
    looks = metric_lookups(metric) if looks is None else looks
    gone = [lk for lk in looks if not lk.found]
    pkgs = missing_packages(metric)
    parts = [f"{p} is not installed" for p in pkgs] + [f"{FILES[lk.key].name} not found" for lk in gone]
    if not parts or not how:
        return "; ".join(parts)
    fix = gone[0].hint() if gone else f"pip install {pkgs[0]}"
    return f"{'; '.join(parts)} (get it: {fix})"


# ---------------------------------------------------------------------------------------------------------------
# Checking a found file


def _state(path: Path) -> dict:
    from jsr.weights import io

    return io.read_state_dict(path)


def _check_vgg16(path: Path) -> None:
    from jsr.metrics.vgg import vgg16_params_from_torch

    vgg16_params_from_torch(_state(path))


def _check_shapes(path: Path, state: Mapping, want: Mapping[str, tuple[int, ...]], model: str) -> None:
    from jsr.weights.convert import CheckpointMismatchError

    problems = []
    for k, shape in want.items():
        if k not in state:
            problems.append(f"missing tensor {k!r}")
        elif tuple(state[k].shape) != shape:
            problems.append(f"tensor {k!r} has shape {tuple(state[k].shape)} but {model} expects {shape}")
    if problems:
        raise CheckpointMismatchError(f"{path}: does not match {model}: " + "; ".join(problems))


def _check_lpips(path: Path) -> None:
    from jsr.metrics import lpips as lp
    from jsr.metrics.vgg import TAP_CHANNELS

    state = {lp._rename(k): v for k, v in _state(path).items()}
    _check_shapes(path, state, {f"lin{k}.weight": (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)},
                  "LPIPS-VGG")


def _check_dists(path: Path) -> None:
    from jsr.metrics.dists import N_WEIGHTS

    _check_shapes(path, _state(path), {n: (1, N_WEIGHTS, 1, 1) for n in ("alpha", "beta")}, "DISTS")


def _check_inception(path: Path) -> None:
    from jsr.metrics.inception import load_inception_params

    load_inception_params(path)


def _check_niqe(path: Path) -> None:
    from jsr.metrics.niqe import load_niqe_params

    load_niqe_params(path)


_CHECKS: dict[str, Callable[[Path], None]] = {"vgg16": _check_vgg16, "lpips": _check_lpips, "dists": _check_dists,
                                              "inception": _check_inception, "niqe": _check_niqe}


def check_file(key: str, path: str | os.PathLike) -> str:
    """Read a weight file and check it against what jsr's loader for it needs (names, shapes, values).

    Returns ``"ok"``, ``"not checked (...)"`` for files another package reads (pyiqa's, timm's), or the problem
    in one line (a mis-shaped tensor, a damaged file, torch missing for a ``.pth``). Reads the whole file (seconds
    for VGG16's 528 MB).
    """
    if key not in FILES:
        raise ValueError(f"unknown metric weight file {key!r}; known: {', '.join(FILES)}")
    if key not in _CHECKS:
        return "not checked (pyiqa/timm read it; jsr only checks that it exists)"
    try:
        _CHECKS[key](Path(path))
    except (ValueError, ImportError, OSError) as e:  # mismatch, damaged file, no torch, unreadable
        return " ".join(str(e).split()) or type(e).__name__  # one line, as the CLIs print errors
    return "ok"


# ---------------------------------------------------------------------------------------------------------------
# Listing


def listing(metrics: list[str] | None = None, check: bool = False) -> dict:
    """Everything :mod:`python -m jsr.metrics files <jsr.metrics.__main__>` prints, as JSON-ready data.

    Returns ``{"torch_hub": [dirs], "hf_hub": dir, "metrics": [{"metric", "title", "status" ("found" or
    "missing"), "missing_packages", "files": [{"key", "title", "status", "path", "looked_in": [{"path", "note",
    "usable"}], "get", "check"?}]}]}``; ``check`` adds each found file's :func:`check_file` result (a failed check
    makes the file, and its metric, ``"unusable"``).
    """
    names = [_check_metric(m) for m in (metrics or list(METRIC_FILES))]
    checked: dict[str, str] = {}
    out = []
    for m in names:
        files = []
        for lk in metric_lookups(m):
            entry = {"key": lk.key, "title": lk.title, "status": "found" if lk.found else "missing",
                     "path": None if lk.path is None else str(lk.path),
                     "looked_in": [{"path": None if c.path is None else str(c.path), "note": c.note,
                                    "usable": c.usable} for c in lk.candidates],
                     "get": None if lk.found else lk.hint()}
            if check and lk.found:
                if lk.key not in checked:  # VGG16 serves two metrics: read it once
                    checked[lk.key] = check_file(lk.key, lk.path)
                entry["check"] = checked[lk.key]
                if not (checked[lk.key] == "ok" or checked[lk.key].startswith("not checked")):
                    entry["status"] = "unusable"
            files.append(entry)
        pkgs = missing_packages(m)
        states = {f["status"] for f in files}
        status = "missing" if pkgs or "missing" in states else "unusable" if "unusable" in states else "found"
        out.append({"metric": m, "title": METRIC_TITLES[m], "status": status, "missing_packages": pkgs,
                    "files": files})
    return {"torch_hub": [str(p) for p in torch_hub_dirs()], "hf_hub": str(hf_hub_dir()), "metrics": out}


def format_listing(data: Mapping) -> str:
    """The human form of :func:`listing`: per metric its status, then per file where it was found or every place
    looked in and the command that gets it."""
    lines = ["Metric weight files (jsr never downloads; a path given on the command line, e.g. --lpips=A,B, "
             "is used instead of these)",
             f"torch hub folders: {', '.join(data['torch_hub'])} (the first is torch's; TORCH_HOME moves it)",
             f"Hugging Face cache: {data['hf_hub']}", ""]
    shown: dict[str, str] = {}
    for m in data["metrics"]:
        lines.append(f"{m['title']}: {m['status']}")
        for p in m["missing_packages"]:
            lines.append(f"  package {p}: not installed (pip install {p})")
        for f in m["files"]:
            if f["status"] != "missing":
                lines.append(f"  {f['key']}: {f['status']}: {f['path']}")
                if "check" in f:
                    lines.append(f"      check: {f['check']}")
                continue
            if f["key"] in shown:  # VGG16 again: said under the first metric that needs it
                lines.append(f"  {f['key']}: missing (see {shown[f['key']]} above)")
                continue
            shown[f["key"]] = m["title"]
            lines.append(f"  {f['key']}: missing: {f['title']}")
            for c in f["looked_in"]:
                where = c["path"] if c["path"] is not None else "-"
                lines.append(f"      looked in {where}  ({c['note']})")
            lines.append(f"      get it: {f['get']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
