"""Checkpoint file I/O: our safetensors reader/writer against the reference package, folders, errors."""
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jsr.weights import io


def test_roundtrip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 2, 3)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(7, dtype=np.int64),
        "scalar": np.array(1.5, np.float32),
    }
    io.write_safetensors(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    back = io.read_safetensors(tmp_path / "a.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(back[k]), v)


def test_reads_files_written_by_safetensors_and_vice_versa(tmp_path):
    t = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)}
    safetensors.numpy.save_file(t, str(tmp_path / "ref.safetensors"))
    ours = io.read_safetensors(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(ours["w"], t["w"])
    io.write_safetensors(tmp_path / "ours.safetensors", t)
    ref = safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))
    np.testing.assert_array_equal(ref["b"], t["b"])


def test_folder_lookup_sharded_and_bin(tmp_path):
    torch = pytest.importorskip("torch")
    a, b = np.ones((2,), np.float32), np.zeros((3,), np.float32)
    sharded = tmp_path / "sharded"
    io.write_safetensors(sharded / "m-1.safetensors", {"a": a})
    io.write_safetensors(sharded / "m-2.safetensors", {"b": b})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    assert set(io.read_state_dict(sharded)) == {"a", "b"}
    binf = tmp_path / "bin"
    binf.mkdir()
    torch.save({"x": torch.arange(4, dtype=torch.bfloat16)}, binf / "diffusion_pytorch_model.bin")
    x = io.read_state_dict(binf)["x"]
    assert x.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(x.astype(np.float32), np.arange(4, dtype=np.float32))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights found"):
        io.read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        io.read_config(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{")
    with pytest.raises(ValueError, match="not a safetensors file"):
        io.read_safetensors(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="unknown checkpoint extension"):
        (tmp_path / "w.onnx").write_bytes(b"")
        io.read_state_dict(tmp_path / "w.onnx")
