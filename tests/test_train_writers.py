"""The training loop's metric writers (jsr.train.writers): CLU's default writer whenever clu.metric_writers imports
(TensorFlow + tensorboard, the [tf] extra CI installs), tensorboardX's as the fallback. Each one's event files are
read back here with a reader of the TFRecord framing and tensorboardX's Event proto (no TensorFlow): the scalars
and the preview images written must be there, step by step and pixel for pixel."""

import importlib.util
import logging
import struct

import cv2
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jsr.train import writers

HAS_CLU_TF = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


def _events(logdir):
    """Every Event of every event file under ``logdir`` (TFRecord: u64 length, u32 CRC, data, u32 CRC)."""
    out = []
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append(ev)
            pos += 12 + n + 4
    return out


def _read(logdir):
    """``({(tag, step): float}, {(tag, step): [uint8 HxWx3 images]})`` from the event files."""
    scalars, images = {}, {}
    for ev in _events(logdir):
        for v in ev.summary.value:
            kind = v.WhichOneof("value")
            plugin = v.metadata.plugin_data.plugin_name
            if kind == "simple_value":  # tensorboardX's scalars
                scalars[(v.tag, ev.step)] = v.simple_value
            elif kind == "image":  # tensorboardX's images: one encoded image per value
                images.setdefault((v.tag, ev.step), []).append(_decode(v.image.encoded_image_string))
            elif kind == "tensor" and plugin == "scalars":  # tf.summary.scalar: a rank-0 float tensor
                t = v.tensor
                scalars[(v.tag, ev.step)] = t.float_val[0] if t.float_val else \
                    float(np.frombuffer(t.tensor_content, np.float32)[0])
            elif kind == "tensor" and plugin == "images":  # tf.summary.image: [width, height, png, png, ...]
                images[(v.tag, ev.step)] = [_decode(b) for b in v.tensor.string_val[2:]]
    return scalars, images


def _decode(png):
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _preview_batch():
    """Two 8-bit-valued float previews [2, 12, 20, 3] in [0, 1] (as the loop writes: LQ | SR | HQ side by side)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 12, 20, 3)).astype(np.float32) / 255.0


def _write_some(writer):
    writer.write_hparams({"lr": "5e-05", "method": "osediff_hparam_value"})
    writer.write_scalars(1, {"loss/total": 0.5, "lr": 1e-4})
    writer.write_scalars(2, {"loss/total": 0.25})
    writer.write_images(2, {"lq_sr_hq": _preview_batch()})
    writer.flush()


def _one_hparams_line(caplog):
    """The log got the hyper-parameters' count, not their values (those are in config.json)."""
    assert "hyper-parameters: 2 values" in caplog.text and "osediff_hparam_value" not in caplog.text


def test_tensorboardx_writer_event_files(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    w = writers.create_writer(tmp_path, prefer_clu=False)
    assert isinstance(w, writers.Writer)
    _write_some(w)
    w.close()
    _one_hparams_line(caplog)
    scalars, images = _read(tmp_path)
    assert scalars[("loss/total", 1)] == 0.5 and scalars[("loss/total", 2)] == 0.25
    assert scalars[("lr", 1)] == pytest.approx(1e-4)
    batch = np.rint(_preview_batch() * 255).astype(np.uint8)
    (tiled,) = images[("lq_sr_hq", 2)]
    np.testing.assert_array_equal(tiled, np.concatenate(list(batch), axis=1))  # the batch in a row


def test_fallback_when_clu_does_not_import(tmp_path, monkeypatch):
    def broken():
        raise ImportError("No module named 'tensorflow'")

    monkeypatch.setattr(writers, "_import_metric_writers", broken)
    w = writers.create_writer(tmp_path)
    assert isinstance(w, writers.Writer)
    w.write_scalars(3, {"x": 1.0})
    w.close()
    assert _read(tmp_path)[0] == {("x", 3): 1.0}


@pytest.mark.skipif(not HAS_CLU_TF, reason="TensorFlow/tensorboard not installed (pip install 'jsr[tf]'): CLU's "
                                           "writer does not import, the tensorboardX one is used")
def test_clu_writer_is_used_and_its_event_files_hold_scalars_and_images(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    w = writers.create_writer(tmp_path)
    assert not isinstance(w, writers.Writer) and type(w).__module__.startswith("clu.metric_writers")
    _write_some(w)
    w.close()
    _one_hparams_line(caplog)
    assert "[1] loss/total=0.5" in caplog.text  # CLU's own log line per scalar write
    scalars, images = _read(tmp_path)
    assert scalars[("loss/total", 1)] == 0.5 and scalars[("loss/total", 2)] == 0.25
    assert scalars[("lr", 1)] == pytest.approx(1e-4)
    batch = np.rint(_preview_batch() * 255).astype(np.uint8)
    got = images[("lq_sr_hq", 2)]
    assert len(got) == 2  # one image per preview
    for a, b in zip(got, batch):
        np.testing.assert_array_equal(a, b)


def test_background_writer_writes_hparams_first_and_delegates(tmp_path, caplog, monkeypatch):
    """train() creates its writer in a thread (CLU's import pulls TensorFlow in): the hyper-parameters are written
    there, every method call waits for the writer, and an error creating it reaches the caller."""
    import threading

    caplog.set_level(logging.INFO)
    made_in = []
    real = writers.create_writer

    def create(logdir, **kw):
        made_in.append(threading.current_thread().name)
        return real(logdir, prefer_clu=False)

    monkeypatch.setattr(writers, "create_writer", create)
    w = writers.BackgroundWriter(tmp_path, hparams={"a": "1", "osediff_hparam_value": "2"})
    w.write_scalars(4, {"y": 2.0})
    w.close()
    assert made_in and made_in[0].startswith("jsr-writer")
    assert "hyper-parameters: 2 values" in caplog.text
    assert _read(tmp_path)[0] == {("y", 4): 2.0}

    def broken(logdir, **kw):
        raise PermissionError(f"{logdir}: read-only")

    monkeypatch.setattr(writers, "create_writer", broken)
    with pytest.raises(PermissionError, match="read-only"):
        writers.BackgroundWriter(tmp_path / "ro").flush()
