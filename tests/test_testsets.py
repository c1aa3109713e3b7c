"""The papers' test sets (jsr.data.testsets): each set's layout found in a tiny fake manual download with the real
folder and file names, the aligned 128/512 crops, the TFDS builders (built here, read back without TensorFlow),
their equality with the folder form of jsr.eval.datasets, and evaluation on a TFDS set."""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

import jsr.eval as ev
from jsr.data.images import to_float01
from jsr.data.testsets import layout, protocol
from jsr.eval import datasets as eval_datasets

needs_tfds = pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                                reason="tensorflow_datasets is not installed (pip install 'jsr[tfds]')")


def _pattern(h, w, tag):
    """uint8 [h, w, 3] whose every pixel says where it is (x, y) and which image it is from (``tag``), so a crop
    and a pairing can be checked exactly."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x + 7 * tag) % 256, (y + 11 * tag) % 256, (x // 256 + 4 * (y // 256) + 16 * tag) % 256],
                    -1).astype(np.uint8)


def _write(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# LQ sides with odd margins around the 128 crop (131 -> top 1, 134 -> left 3): the aligned HQ crop starts at (4, 12)
LQ_HW, HQ_HW = (131, 134), (524, 536)
LQ_BOX, HQ_BOX = (slice(1, 129), slice(3, 131)), (slice(4, 516), slice(12, 524))


def _fake_realsr(root):
    """RealSR (V3): {Canon,Nikon}/Test/4/<cam>_00k_{HR,LR4}.png, plus Train/ and Test/2 files that must be left
    out. Returns {name: tag}."""
    tags = {}
    for c, cam in enumerate(("Canon", "Nikon")):
        for k in (1, 2):
            name, tag = f"{cam}_00{k}", 2 * c + k
            _write(root / cam / "Test" / "4" / f"{name}_HR.png", _pattern(*HQ_HW, tag))
            _write(root / cam / "Test" / "4" / f"{name}_LR4.png", _pattern(*LQ_HW, tag + 50))
            tags[name] = tag
        _write(root / cam / "Test" / "2" / f"{cam}_001_LR2.png", _pattern(8, 8, 0))
        _write(root / cam / "Train" / "4" / f"{cam}_099_HR.png", _pattern(8, 8, 0))
    return tags


def _fake_drealsr(root):
    """DRealSR, nested as its archive unpacks: x4/Test_x4/Test_x4/test_{HR,LR}/<name>_x{4,1}.png, plus an x2 set."""
    tags = {}
    test = root / "DRealSR" / "x4" / "Test_x4" / "Test_x4"
    for tag, name in enumerate(("Canon_10", "Sony_3", "panasonic_7"), start=1):
        _write(test / "test_HR" / f"{name}_x4.png", _pattern(*HQ_HW, tag))
        _write(test / "test_LR" / f"{name}_x1.png", _pattern(*LQ_HW, tag + 50))
        tags[name] = tag
    _write(root / "DRealSR" / "x2" / "Test_x2" / "test_HR" / "Canon_10_x2.png", _pattern(8, 8, 0))
    return tags, test


def _fake_div2k(root, rng):
    """DIV2K_valid_HR/0801.png, 0802.png: smooth 8-bit images a little larger than the 512 crop."""
    for k, name in enumerate(("0801", "0802")):
        coarse = rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (533, 521), interpolation=cv2.INTER_CUBIC)
        _write(root / "DIV2K_valid_HR" / f"{name}.png", img)


def _check_pair(lq, hq, tag):
    """``lq``/``hq`` (uint8 or float in [0, 1]) are the aligned centre crops of the fake pair ``tag``."""
    to8 = (lambda a: a if a.dtype == np.uint8 else np.rint(a * 255).astype(np.uint8))
    np.testing.assert_array_equal(to8(lq), _pattern(*LQ_HW, tag + 50)[LQ_BOX])
    np.testing.assert_array_equal(to8(hq), _pattern(*HQ_HW, tag)[HQ_BOX])


# ---------------------------------------------------------------------------------------------------------------
# Layouts and crops (no TFDS)


def test_realsr_layout_pairs_canon_and_nikon_test_x4_only(tmp_path):
    tags = _fake_realsr(tmp_path / "RealSR(V3)")
    for root in (tmp_path / "RealSR(V3)", tmp_path):  # the set's folder, or the one holding it
        pairs = layout.realsr_pairs(root)
        assert [p.name for p in pairs] == ["Canon_001", "Canon_002", "Nikon_001", "Nikon_002"]
        assert all(p.lq.endswith(f"{p.name}_LR4.png") and p.hq.endswith(f"{p.name}_HR.png") for p in pairs)
    assert set(tags) == {p.name for p in pairs}
    (tmp_path / "RealSR(V3)" / "Nikon" / "Test" / "4" / "Nikon_002_LR4.png").unlink()
    with pytest.raises(ValueError, match=r"1 HR file\(s\) without an LR4 file \(Nikon_002\)"):
        layout.realsr_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no Canon/Test/4/ .*expected RealSR\(V3\)/\{Canon,Nikon\}"):
        layout.realsr_pairs(tmp_path / "RealSR(V3)" / "Canon")


def test_drealsr_and_div2k_layouts(tmp_path):
    tags, test = _fake_drealsr(tmp_path)
    pairs = layout.drealsr_pairs(tmp_path)
    assert [p.name for p in pairs] == sorted(tags) == ["Canon_10", "Sony_3", "panasonic_7"]
    assert all(Path(p.lq).name == f"{p.name}_x1.png" and Path(p.hq).name == f"{p.name}_x4.png" for p in pairs)
    assert [p.name for p in layout.drealsr_pairs(test)] == sorted(tags)  # given the Test_x4 folder itself
    (test / "test_LR" / "Sony_3_x1.png").rename(test / "test_LR" / "Sony_4_x1.png")
    with pytest.raises(ValueError, match="Sony_4"):
        layout.drealsr_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Test_x4/ folder"):
        layout.drealsr_pairs(tmp_path / "DRealSR" / "x2")

    _fake_div2k(tmp_path / "div2k", np.random.default_rng(0))
    for root in (tmp_path / "div2k", tmp_path / "div2k" / "DIV2K_valid_HR"):
        files = layout.div2k_val_images(root)
        assert [(f.name, f.lq) for f in files] == [("0801", None), ("0802", None)]
    with pytest.raises(FileNotFoundError, match="DIV2K_valid_HR/0801.png"):
        layout.div2k_val_images(tmp_path / "DRealSR")


def test_aligned_crops_and_their_errors():
    lq, hq = _pattern(*LQ_HW, 1), _pattern(*HQ_HW, 2)
    a, b = protocol.crop_pair(lq, hq)
    np.testing.assert_array_equal(a, lq[LQ_BOX])
    np.testing.assert_array_equal(b, hq[HQ_BOX])  # at 4x the LQ offset, not at the HQ's own centre (6, 12)
    with pytest.raises(ValueError, match="LQ is 134x120, smaller than the 128x128 crop"):
        protocol.paired_crop_boxes((120, 134), HQ_HW)
    with pytest.raises(ValueError, match="HQ is 536x500, too small"):
        protocol.paired_crop_boxes(LQ_HW, (500, 536), what="X")
    with pytest.raises(ValueError, match="multiple of the scale"):
        protocol.paired_crop_boxes(LQ_HW, HQ_HW, crop=510)


def test_folder_form_with_crop_gives_the_protocol_crops(tmp_path):
    tags, test = _fake_drealsr(tmp_path)
    spec = ev.parse_dataset(f"DRealSR:lq={test / 'test_LR'},hq={test / 'test_HR'},strip=_x[14]$,crop=512")
    ds = eval_datasets.open_dataset(spec)
    assert ds.names == sorted(tags) and spec.paired
    ev.check_inputs([ds])
    for i, name in enumerate(ds.names):
        _check_pair(ds[i].lq, ds[i].hq, tags[name])
    with pytest.raises(ValueError, match=r"3 pair\(s\) where the crop=1024 does not fit"):
        ev.check_inputs([eval_datasets.open_dataset(ev.parse_dataset(
            f"D:lq={test / 'test_LR'},hq={test / 'test_HR'},strip=_x[14]$,crop=1024"))])


def test_parse_tfds_dataset():
    s = ev.parse_dataset("tfds:realsr")
    assert (s.name, s.tfds, s.split, s.data_dir, s.hq, s.paired) == ("RealSR", "realsr", "test", "", "", True)
    s = ev.parse_dataset("tfds:div2k_val, data_dir=/d/tfds, split=test[:10], label=DIV2K-10")
    assert (s.name, s.tfds, s.split, s.data_dir) == ("DIV2K-10", "div2k_val", "test[:10]", "/d/tfds")
    assert ev.parse_dataset("tfds:my_pairs").name == "my_pairs"
    for bad, msg in (("tfds:", "want NAME"), ("tfds:realsr,hq=/a", "bad item"), ("tfds:data_dir=/a", "want")):
        with pytest.raises(ValueError, match=msg):
            ev.parse_dataset(bad)
    with pytest.raises(ValueError, match="open it with open_dataset"):
        ev.EvalDataset(ev.parse_dataset("tfds:realsr"))


def test_cli_check_lists_a_manual_folder(tmp_path, capsys):
    from jsr.data.testsets.__main__ import main

    _fake_realsr(tmp_path / "RealSR(V3)")
    assert main(["build", "realsr", str(tmp_path), "--check"]) == 0
    assert "RealSR: 4 images (the papers' set: 100); first Canon_001, last Nikon_002" in capsys.readouterr().out
    assert main(["build", "drealsr", str(tmp_path), "--check"]) == 2  # a user error: one line, status 2
    err = capsys.readouterr().err
    assert err.startswith("error: DRealSR: no Test_x4/") and len(err.strip().splitlines()) == 1, err
    assert main(["list"]) == 0 and "div2k_val" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# TFDS builders (tensorflow_datasets without TensorFlow)


@needs_tfds
def test_realsr_and_drealsr_builders(tmp_path):
    from jsr.data import testsets

    data = tmp_path / "tfds"
    tags = _fake_realsr(tmp_path / "dl" / "RealSR(V3)")
    d_tags, test = _fake_drealsr(tmp_path / "dl2")
    for name, manual, want in (("realsr", tmp_path / "dl", tags), ("drealsr", tmp_path / "dl2", d_tags)):
        out = testsets.build(name, manual, data)
        assert out == data / name / "1.0.0" and list(out.glob("*.array_record*"))
        src = testsets.open_split(name, data, decode=True)
        assert len(src) == len(want)  # every pair, nothing from Train/ or other scales
        for i in range(len(src)):
            ex = src[i]
            assert ex["lq"].shape == (128, 128, 3) and ex["hq"].shape == (512, 512, 3) and ex["lq"].dtype == np.uint8
            _check_pair(ex["lq"], ex["hq"], want[ex["name"].decode()])  # pairing and aligned crops

    # The TFDS form and the folder form give the same arrays; the evaluation reads the TFDS one sorted by name.
    tf_ds = eval_datasets.open_dataset(ev.parse_dataset("tfds:drealsr"), tfds_data_dir=str(data))
    folder = eval_datasets.open_dataset(ev.parse_dataset(
        f"DRealSR:lq={test / 'test_LR'},hq={test / 'test_HR'},strip=_x[14]$,crop=512"))
    assert tf_ds.names == folder.names and tf_ds.name == "DRealSR" and tf_ds.scale == 4
    assert tf_ds.spec.data_dir == str(data)  # recorded in the report
    for i in range(len(folder)):
        a, b = tf_ds[i], folder[i]
        np.testing.assert_array_equal(a.lq, b.lq)
        np.testing.assert_array_equal(a.hq, b.hq)
    assert len(eval_datasets.open_dataset(ev.parse_dataset(f"tfds:realsr,data_dir={data}"), max_images=3)) == 3
    with pytest.raises(FileNotFoundError, match=r"'div2k_val' is not prepared in .*python -m jsr.data.testsets "
                                                r"build div2k_val MANUAL_DIR --data_dir"):
        eval_datasets.open_dataset(ev.parse_dataset(f"tfds:div2k_val,data_dir={data}"))
    with pytest.raises(FileNotFoundError, match="DRealSR: no Test_x4/"):
        testsets.build("drealsr", tmp_path / "dl", tmp_path / "other")


@needs_tfds
def test_div2k_builder_equals_the_degraded_folder_form_and_evaluates(tmp_path):
    from jsr.data import testsets
    from tests.helpers import standin_restorer

    _fake_div2k(tmp_path / "DIV2K", np.random.default_rng(1))
    data = tmp_path / "tfds"
    testsets.build("div2k_val", tmp_path / "DIV2K", data)
    tf_ds = eval_datasets.open_dataset(ev.parse_dataset(f"tfds:div2k_val,data_dir={data}"))
    folder = eval_datasets.open_dataset(ev.parse_dataset(
        f"DIV2K-Val:hq={tmp_path / 'DIV2K' / 'DIV2K_valid_HR'},crop=512,seed=0"))
    assert tf_ds.names == folder.names == ["0801", "0802"] and tf_ds.name == "DIV2K-Val"
    for i in range(2):
        a, b = tf_ds[i], folder[i]
        assert a.lq.shape == (128, 128, 3) and a.hq.shape == (512, 512, 3)
        np.testing.assert_array_equal(a.lq, b.lq)  # the same seeded degradation, stored losslessly
        np.testing.assert_array_equal(a.hq, b.hq)
    hq = cv2.cvtColor(cv2.imread(str(tmp_path / "DIV2K" / "DIV2K_valid_HR" / "0802.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(tf_ds[1].hq, to_float01(hq[4:516, 10:522]))  # the 512 centre crop of 521x533

    report = ev.evaluate([tf_ds], tmp_path / "out", restorer=standin_restorer(method="ctsr"),
                         suite=ev.MetricSuite(), t_values=[0.0], progress=False, log=lambda m: None, num_samples=0)
    assert [r["n"] for r in report["rows"]] == [2]
    assert report["datasets"][0]["tfds"] == "div2k_val" and [r["name"] for r in report["images"]] == ["0801", "0802"]
    assert not (tmp_path / "out" / "DIV2K-Val" / "LQ").exists()  # stored pairs are not written out again
