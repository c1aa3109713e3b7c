"""Damaged weight and config files: every reader (safetensors, .bin/.pkl, JSON configs, Orbax folders, peft LoRA
files) reports one line that starts with the file's path and says what is wrong, and ``python -m jsr.weights``
turns it into ``error: ...`` on stderr with exit code 2."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.weights import io, native
from jsr.weights.io import CorruptFileError

REPO = Path(__file__).resolve().parents[1]


def _raises_one_line(path, fn, *args, match: str) -> str:
    """``fn(*args)`` raises CorruptFileError whose message is one line, starts with ``path`` and matches."""
    with pytest.raises(CorruptFileError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


def _safetensors(path: Path, shape=(128, 128)) -> Path:
    io.write_safetensors(path, {"w": np.ones(shape, np.float32)})
    return path


def test_truncated_safetensors(tmp_path):
    f = _safetensors(tmp_path / "diffusion_pytorch_model.safetensors")
    data = f.read_bytes()
    data_start = 8 + struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:data_start + 13_563])  # the case: header intact, data cut short
    msg = _raises_one_line(f, io.read_safetensors, f, match="truncated")
    assert msg.endswith("truncated: header says 65,536 bytes of data, file has 13,563")
    # Through the folder reader too.
    _raises_one_line(f, io.read_state_dict, tmp_path, match="truncated")


def test_garbage_and_header_length_past_eof(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _raises_one_line(garbage, io.read_safetensors, garbage, match="header length says")
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 1000) + b"{}")
    _raises_one_line(past, io.read_safetensors, past, match="header length says 1,000 bytes, file has 2")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _raises_one_line(tiny, io.read_safetensors, tiny, match="shorter than its 8-byte header length")
    notjson = tmp_path / "notjson.safetensors"
    notjson.write_bytes(struct.pack("<Q", 4) + b"\xff{{{")
    _raises_one_line(notjson, io.read_safetensors, notjson, match="header is not JSON")


def _with_header(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_header_inconsistent_with_its_data(tmp_path):
    f = _with_header(tmp_path / "span.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                     bytes(16))
    _raises_one_line(f, io.read_safetensors, f, match=r"'w': shape \[2, 2\] of F32 needs 16 bytes, data_offsets "
                                                      r"\[0, 8\] span 8")
    f = _with_header(tmp_path / "dtype.safetensors", {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                     bytes(8))
    _raises_one_line(f, io.read_safetensors, f, match="dtype C64")
    f = _with_header(tmp_path / "offsets.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                     bytes(8))
    _raises_one_line(f, io.read_safetensors, f, match="data_offsets")
    f = _with_header(tmp_path / "shape.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                     bytes(4))
    _raises_one_line(f, io.read_safetensors, f, match="non-negative")
    # A valid file whose tensors are all empty has no data section (nothing to memory-map) and still reads.
    empty = _with_header(tmp_path / "empty.safetensors", {"w": {"dtype": "F32", "shape": [0, 3],
                                                                "data_offsets": [0, 0]}}, b"")
    assert io.read_safetensors(empty)["w"].shape == (0, 3)


def test_bad_json_config_and_index(tmp_path):
    (tmp_path / "config.json").write_text('{"in_channels": 4,\n "sample_size": }')
    _raises_one_line(tmp_path / "config.json", io.read_config, tmp_path, match="line 2 column 17")
    (tmp_path / "config.json").write_text("[1, 2]")
    _raises_one_line(tmp_path / "config.json", io.read_config, tmp_path, match="not an object")
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b"\xff\xfe garbage")
    _raises_one_line(index, io.read_state_dict, tmp_path, match="not UTF-8")


def test_truncated_and_garbage_torch_files(tmp_path):
    torch = pytest.importorskip("torch")
    f = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": torch.ones(64, 64)}, f)
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])  # torch itself says only "OSError: [Errno 22] Invalid argument"
    _raises_one_line(f, io.read_state_dict, f, match="truncated or damaged PyTorch checkpoint")
    _raises_one_line(f, io.read_state_dict, tmp_path, match="truncated or damaged PyTorch checkpoint")
    g = tmp_path / "release.pkl"
    g.write_bytes(np.random.default_rng(1).bytes(3000))
    _raises_one_line(g, io.read_state_dict, g, match=r"not a readable PyTorch checkpoint \(torch.load")
    e = tmp_path / "empty.pth"
    e.write_bytes(b"")
    _raises_one_line(e, io.read_state_dict, e, match="empty file")


def test_peft_reader_names_the_file(tmp_path):
    from jsr.weights.peft import load_peft_lora

    folder = tmp_path / "lora"
    folder.mkdir()
    f = _safetensors(folder / "adapter_model.safetensors", (4, 4))
    f.write_bytes(f.read_bytes()[:-10])
    _raises_one_line(f, load_peft_lora, folder, match="truncated")
    (folder / "adapter_config.json").write_text("{r: 4}")
    _raises_one_line(folder / "adapter_config.json", load_peft_lora, folder, match="adapter config is not valid JSON")
    pytest.importorskip("torch")
    pkl = tmp_path / "osediff.pkl"
    pkl.write_bytes(b"\x80\x04garbage")
    _raises_one_line(pkl, load_peft_lora, pkl, match="not a readable PyTorch checkpoint")


def test_damaged_orbax_folder(tmp_path):
    abstract = {"w": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
    folder = tmp_path / "unet"
    native.write_native(folder, {"w": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}, {"a": 1})
    np.testing.assert_array_equal(native.read_native(folder, abstract, model="m")["w"]["kernel"],
                                  np.arange(6).reshape(2, 3))
    (folder / native.PARAMS_DIR / "_METADATA").write_bytes(b"\x00garbage")
    _raises_one_line(folder.absolute() / native.PARAMS_DIR, lambda: native.read_native(folder, abstract, model="m"),
                     match="not a readable Orbax checkpoint")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jsr.weights", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_cli_info_corrupt_config_exits_2_with_one_line(tmp_path):
    (tmp_path / "unet").mkdir()
    cfg = tmp_path / "unet" / "config.json"
    cfg.write_text('{"_class_name": "UNet2DConditionModel", ')
    r = _run_cli("info", str(tmp_path))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: model config is not valid JSON"), r.stderr


def test_cli_main_truncated_weights_exit_2(tmp_path, capsys):
    """The issue's case through ``main``: a valid (tiny) config, weights cut short -> exit 2, one line."""
    from jsr.models.presets import preset
    from jsr.weights import __main__ as cli

    comp = tmp_path / "sd" / "text_encoder"  # the cheapest component to build (only its abstract shapes are made)
    io.write_config(comp, preset("tiny")["text_encoder"])
    w = _safetensors(comp / "model.safetensors")
    w.write_bytes(w.read_bytes()[:-1000])
    assert cli.main(["info", str(tmp_path / "sd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {w}: truncated: header says 65,536 bytes of data, file has 64,536"], err
