"""The Grain pipeline: batches, determinism, worker-count independence, skipping, resume, sharding."""

import json
import logging as py_logging

import cv2
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jsr.data import pipeline as P
from jsr.data import sources as S

# Small crops keep each example at a few milliseconds; every property tested is size-independent.
BASE = dict(crop_size=32, batch_size=4, synthetic_images=12, synthetic_size=40, prefetch_batches=0,
            read_threads=0)


def _iter(cfg=None, source=None, **over):
    return P.make_iterator({**BASE, **(cfg or {}), **over}, source=source, process_index=0, process_count=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def folder(tmp_path):
    """Eight images of mixed sizes/formats, one corrupt file, one too small for the crop."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        img = S.synthetic_image(5, i, 40 + 4 * i, 48)
        ext = ".png" if i % 2 else ".jpg"
        cv2.imwrite(str(root / ("sub" if i % 3 == 0 else "") / f"img{i}{ext}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (root / "img_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    cv2.imwrite(str(root / "img_tiny.png"), S.synthetic_image(5, 99, 20, 24))
    (root / "sub" / "img3.txt").write_text("sidecar prompt")  # next to sub/img3.png
    return root


def test_batches_have_the_documented_layout():
    it = _iter(prompt="fixed", prompt_text="a test prompt")
    batch = next(it)
    assert set(batch) == {"hq", "lq", "lq_small", "prompt"}
    assert batch["hq"].shape == (4, 32, 32, 3) and batch["lq"].shape == (4, 32, 32, 3)
    assert batch["lq_small"].shape == (4, 8, 8, 3)
    for k in ("hq", "lq", "lq_small"):
        assert batch[k].dtype == np.float32 and batch[k].min() >= 0 and batch[k].max() <= 1
    assert batch["prompt"].shape == (4,) and list(batch["prompt"]) == ["a test prompt"] * 4
    assert not np.array_equal(batch["hq"], batch["lq"])


def test_hq_crops_come_from_the_source_images():
    src = S.SyntheticSource(6, 40, 40, seed=3)
    it = _iter(source=src, shuffle=False, hflip=False, batch_size=6)
    hq = next(it)["hq"]
    for i in range(6):
        full = S.to_float01(src[i]["image"])
        found = any(np.array_equal(full[y:y + 32, x:x + 32], hq[i]) for y in range(9) for x in range(9))
        assert found, f"example {i} is not a crop of image {i}"


def test_flips_happen_and_only_when_enabled():
    src = S.SyntheticSource(1, 32, 32, seed=4)  # crop = whole image: the only freedom left is the flip
    img = S.to_float01(src[0]["image"])
    flipped = [np.array_equal(b["hq"][0], img[:, ::-1]) for b in _take(_iter(source=src, batch_size=1), 16)]
    assert 3 <= sum(flipped) <= 13
    plain = _take(_iter(source=src, batch_size=1, hflip=False), 6)
    assert all(np.array_equal(b["hq"][0], img) for b in plain)


def test_same_seed_same_stream_other_seed_other_stream():
    a, b = _take(_iter(), 3), _take(_iter(), 3)
    _assert_same(a, b)
    c = _take(_iter(seed=1), 3)
    assert not np.array_equal(a[0]["lq"], c[0]["lq"])


def test_epochs_are_reshuffled_and_redegraded():
    batches = _take(_iter(batch_size=12), 2)  # exactly two epochs of the 12 images
    first, second = batches[0]["hq"], batches[1]["hq"]
    assert not np.array_equal(first, second)


def test_corrupt_and_small_images_are_skipped_counted_and_logged(folder, caplog):
    caplog.set_level(py_logging.WARNING)
    it = _iter({"source": "folder", "path": str(folder), "small_images": "skip", "num_epochs": 1,
                "drop_remainder": False, "crop_size": 40, "prompt": "sidecar"})
    batches = list(it)
    # 10 files: 1 corrupt, 1 tiny (20x24), 8 usable (heights 40..68, width 48 >= 40).
    assert sum(len(b["prompt"]) for b in batches) == 8
    assert it.skipped == {"unreadable": 1, "too_small": 1}
    assert "img_corrupt.png" in caplog.text and "img_tiny.png" in caplog.text
    assert "sidecar prompt" in np.concatenate([b["prompt"] for b in batches])


def test_small_images_are_padded_by_default(folder):
    it = _iter({"source": "folder", "path": str(folder), "num_epochs": 1, "drop_remainder": False,
                "crop_size": 40})
    assert sum(len(b["prompt"]) for b in it) == 9  # the tiny image is padded; only the corrupt one is dropped
    assert it.skipped == {"unreadable": 1}


def test_pad_to_crop_reflects():
    img = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    out = P.pad_to_crop(img, 4)
    assert out.shape == (4, 4, 1)
    np.testing.assert_array_equal(out[:2, :3], img)
    np.testing.assert_array_equal(out[2, :3], img[0, :, ])  # reflect-101 about the last row
    assert P.pad_to_crop(np.ones((1, 1, 3)), 3).shape == (3, 3, 3)


def test_worker_count_does_not_change_the_stream(folder):
    """Same batches with 0 and 2 worker processes, including a corrupt file shifting the stream."""
    cfg = {"source": "folder", "path": str(folder), "crop_size": 32}
    ref = _take(_iter(cfg), 5)
    it = _iter(cfg, num_workers=2, read_threads=1, prefetch_batches=2)
    try:
        _assert_same(ref, _take(it, 5))
        assert it.skipped.get("unreadable", 0) >= 1  # counted in the main process although decoded in workers
    finally:
        it.close()


def test_resume_from_state_continues_the_exact_stream():
    it = _iter(prefetch_batches=2, read_threads=2)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what Orbax's JsonSave stores
    expected = _take(it, 3)
    resumed = _iter(prefetch_batches=2, read_threads=2)
    resumed.set_state(state)
    _assert_same(expected, _take(resumed, 3))


def test_resume_with_workers():
    """The default layout (worker processes + batches prefetched in a thread) resumes exactly too."""
    it = _iter(num_workers=2, read_threads=1, prefetch_batches=2)
    try:
        _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 2)
    finally:
        it.close()
    resumed = _iter(num_workers=2, read_threads=1, prefetch_batches=2)
    try:
        resumed.set_state(state)
        _assert_same(expected, _take(resumed, 2))
    finally:
        resumed.close()


def test_processes_split_the_batch_and_the_stream():
    cfg = {**BASE, "batch_size": 4}
    host = [P.make_iterator(cfg, process_index=i, process_count=2) for i in range(2)]
    single = _take(_iter(), 2)
    parts = [_take(h, 2) for h in host]
    for step in range(2):
        assert parts[0][step]["hq"].shape[0] == 2
        got = np.concatenate([parts[0][step]["hq"], parts[1][step]["hq"]])
        # Host i holds rows [2i, 2i + 2) of every global batch: together, the single process's batch, in order.
        np.testing.assert_array_equal(got, single[step]["hq"])
    with pytest.raises(ValueError, match="divisible"):
        P.make_iterator({**cfg, "batch_size": 3}, process_index=0, process_count=2)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(KeyError, match="crop_sise"):
        P.make_iterator({"crop_sise": 64}, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data.source"):
        P.make_iterator({"source": "webdataset"}, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data.path"):
        P.make_iterator({"source": "folder"}, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="crop_size"):
        P.make_iterator({"crop_size": 30}, process_index=0, process_count=1)


def test_degradation_config_reaches_the_workers():
    mild = _take(_iter(degradation=P.degradation_config("pisa")), 1)[0]
    strong = _take(_iter(), 1)[0]
    np.testing.assert_array_equal(mild["hq"], strong["hq"])  # same crops: the degradation seed stream is shared
    assert not np.array_equal(mild["lq"], strong["lq"])
    cfg = P.resolve_config({"degradation": {"preset": "pisa"}})
    assert tuple(cfg.degradation.first.noise_sigma) == (1.0, 15.0)


def test_shard_batch_splits_the_batch_over_data_axes():
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 fake CPU devices"
    mesh = Mesh(np.array(devices).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    batch = next(_iter(batch_size=8, prompt="fixed", prompt_text="p"))
    out = P.shard_batch(batch, mesh)
    assert list(out["prompt"]) == ["p"] * 8  # strings stay on the host
    for key in ("hq", "lq", "lq_small"):
        arr = out[key]
        assert arr.shape == batch[key].shape
        assert arr.sharding.spec[0] == ("data", "fsdp")
        assert {s.data.shape[0] for s in arr.addressable_shards} == {1}  # one example per device
        np.testing.assert_array_equal(np.asarray(arr), batch[key])
    with pytest.raises(ValueError, match="divisible"):
        P.shard_batch({"hq": batch["hq"][:6]}, mesh)
    tp = Mesh(np.array(devices).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    assert P.shard_batch({"hq": batch["hq"][:2]}, tp)["hq"].sharding.spec[0] == ("data", "fsdp")


def test_an_image_failing_after_decode_is_skipped_not_fatal():
    good = S.synthetic_image(0, 0, 32, 32)

    class Records:
        def __len__(self):
            return 4

        def __getitem__(self, i):  # item 2 decodes to an array no conversion accepts (int64 pixels)
            return {"name": f"rec{i}", "image": good.astype(np.int64) if i == 2 else good, "prompt": ""}

    it = _iter(source=Records(), batch_size=1, num_epochs=1, drop_remainder=False, shuffle=False)
    assert len(list(it)) == 3 and it.skipped == {"degrade_failed": 1}


def test_float_images_with_nan_are_sanitised():
    img = np.full((4, 4, 3), np.nan, np.float32)
    img[0, 0] = [np.inf, -np.inf, 0.5]
    out = S.to_float01(img)
    assert np.isfinite(out).all() and out[0, 0].tolist() == [1.0, 0.0, 0.5] and out[1, 1].tolist() == [0, 0, 0]
