"""Reading and writing checkpoint files: safetensors (any dtype, bf16 included), PyTorch ``.bin``, config JSON.

Our own safetensors reader/writer (the format is an 8-byte little-endian header length, a JSON header and the
raw tensor bytes) because ``safetensors.numpy`` cannot hold bfloat16, which SD checkpoints often use; numpy
gets bfloat16 from ``ml_dtypes``. Files are memory-mapped, so loading the 3.5 GB SD-2.1 UNet costs no copy until
the tensors are converted.

Every reader checks what it reads against the file itself (a safetensors header against the file size, tensor
shapes against their byte ranges, JSON syntax, ``torch.load`` failures) and reports a damaged file as one
:class:`CorruptFileError` whose one-line message starts with the path: ``<path>: truncated: header says 3,279,616
bytes of data, file has 13,563``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

# File names diffusers/transformers use, in the order we look for them.
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
BIN_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


# The safetensors format caps the JSON header at 100 MB; a larger length is not a header (garbage bytes read as one).
_MAX_HEADER = 100_000_000


class CorruptFileError(ValueError):
    """A weight or config file that exists but cannot be read as what it claims to be (truncated, garbage, bad
    JSON, inconsistent safetensors header, unreadable pickle or Orbax checkpoint). The message is one line:
    ``<path>: <what is wrong>``."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file (a ``config.json``, a shard index, an adapter config); ``what`` names it in errors.

    Raises:
      CorruptFileError: the file is not UTF-8 JSON (message: path, line and column).
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: {what} is not UTF-8 text (byte {e.start:,})") from None
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: {what} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") \
            from None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The validated JSON header of a ``.safetensors`` file and the byte offset of its data section.

    Checked against the file: the header length fits in the file, the header is a JSON object, every tensor has a
    known dtype, a shape of non-negative integers and ``data_offsets`` whose span is exactly ``prod(shape) *
    itemsize`` bytes and lies inside the data section.

    Raises:
      CorruptFileError: any of these checks fails; one line naming the file, the tensor and the numbers.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CorruptFileError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header "
                               "length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CorruptFileError(f"{path}: not a safetensors file, or truncated: header length says {n:,} bytes, "
                                   f"file has {size - 8:,} after the 8-byte length")
        if n > _MAX_HEADER:
            raise CorruptFileError(f"{path}: not a safetensors file (header length {n:,} bytes is over the "
                                   f"format's {_MAX_HEADER:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not a safetensors file (header is not JSON: {_one_line(e)})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, "
                               "not an object)")
    data_start = 8 + n
    data_size = size - data_start
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CorruptFileError(f"{path}: tensor {name!r}: header entry {_one_line(info)[:80]} lacks dtype, "
                                   "shape or data_offsets")
        if info["dtype"] not in _DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which jsr cannot read")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CorruptFileError(f"{path}: tensor {name!r}: shape {shape} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CorruptFileError(f"{path}: tensor {name!r}: data_offsets {offsets} are not [start, end] with "
                                   "0 <= start <= end")
        need = math.prod(shape) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if offsets[1] - offsets[0] != need:
            raise CorruptFileError(f"{path}: tensor {name!r}: shape {shape} of {info['dtype']} needs {need:,} bytes, "
                                   f"data_offsets {offsets} span {offsets[1] - offsets[0]:,}")
        data_end = max(data_end, offsets[1])
    if data_end > data_size:
        raise CorruptFileError(f"{path}: truncated: header says {data_end:,} bytes of data, file has {data_size:,}")
    return header, data_start


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (memory-mapped, read-only), keyed by name.

    Raises:
      CorruptFileError: a truncated file, garbage, or a header inconsistent with the file
        (:func:`read_safetensors_header`).
    """
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    # An empty data section cannot be memory-mapped; its tensors (all of zero size) view an empty buffer.
    raw = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if path.stat().st_size > data_start
           else np.zeros(0, np.uint8))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dt = np.dtype(_DTYPES[info["dtype"]])
        out[name] = raw[start:end].view(dt).reshape(info["shape"])
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array, any dtype in the safetensors set, bf16 included) to ``path``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.require(np.asarray(tensors[name]), requirements="C")  # keeps 0-d shapes
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte alignment of the data section
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch "
                          "(pip install 'jsr[torch]'), or convert it to safetensors") from None
    state = torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: _torch_to_numpy(v) for k, v in state.items() if hasattr(v, "detach")}


def torch_load(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (torch must be importable), its failures as
    one :class:`CorruptFileError` line.

    torch reports a truncated zip checkpoint as ``OSError: [Errno 22] Invalid argument`` and garbage as a
    multi-paragraph ``UnpicklingError``; the message here says which of the two it is and keeps the specific part.
    """
    import torch

    size = path.stat().st_size
    if size == 0:
        raise CorruptFileError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6 is a zip archive
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:  # no central directory: cut short
            raise CorruptFileError(f"{path}: truncated or damaged PyTorch checkpoint (a zip archive that cannot be "
                                   f"opened: {_one_line(e)}; file has {size:,} bytes)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many types (OSError, EOFError, KeyError, ...) for one cause
        text = str(e)
        detail = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        reason = (f"torch.load(weights_only=True): {_one_line(detail.group(1))}" if detail
                  else f"{type(e).__name__}: {_one_line(text.splitlines()[0]) if text.strip() else 'no detail'}")
        raise CorruptFileError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict from a file or a diffusers/transformers model folder.

    A folder is searched for (sharded) safetensors first, then ``.bin`` (needs torch). Tensors keep their
    stored dtype.

    Raises:
      FileNotFoundError: no such file, or a folder without weights. CorruptFileError: a damaged file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            return _read_bin(path)
        raise ValueError(f"{path}: unknown checkpoint extension {path.suffix!r} (want .safetensors or .bin)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or model folder")
    for name in SAFETENSORS_NAMES:
        if (path / name).is_file():
            return read_safetensors(path / name)
    for name in INDEX_NAMES:
        if (path / name).is_file():
            index = read_json(path / name, "safetensors shard index")
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CorruptFileError(f"{path / name}: not a safetensors shard index (no weight_map object)")
            state: dict[str, np.ndarray] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(read_safetensors(path / shard))
            return state
    for name in BIN_NAMES:
        if (path / name).is_file():
            return _read_bin(path / name)
    raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(SAFETENSORS_NAMES + BIN_NAMES)})")


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a model folder as a dict.

    Raises:
      FileNotFoundError: no ``config.json``. CorruptFileError: it is not a JSON object.
    """
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (is this a diffusers/transformers model folder?)")
    config = read_json(cfg, "model config")
    if not isinstance(config, dict):
        raise CorruptFileError(f"{cfg}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def write_config(folder: str | os.PathLike, config: Mapping) -> None:
    """Write ``config.json`` into ``folder`` (created if needed)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename, so a reader (another process, a
    run killed mid-write) sees the old file or the whole new one, never a part; makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
