"""Image sources: folders, paired folders, TFDS, synthetic (jsr.data.sources)."""

import importlib.util

import cv2
import numpy as np
import pytest

from jsr.data import sources as S


def _write(path, rgb, **kw):
    """Write an RGB (or gray/RGBA) array with OpenCV, converting to its channel order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
        arr = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(str(path), arr, *kw.values())
    return path


@pytest.fixture
def rgb8():
    return S.synthetic_image(0, 1, 24, 32)


def test_decode_formats_and_depths(tmp_path, rgb8):
    exact = {"a.png": rgb8, "b.bmp": rgb8, "c.tif": rgb8, "d.webp": rgb8}
    for name, img in exact.items():
        _write(tmp_path / name, img, params=[cv2.IMWRITE_WEBP_QUALITY, 101] if name.endswith("webp") else [])
        out = S.load_image(tmp_path / name)
        assert out.shape == (24, 32, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, rgb8 / 255.0, atol=1e-6, err_msg=name)  # lossless formats round-trip
    _write(tmp_path / "e.jpg", rgb8)
    assert np.abs(S.load_image(tmp_path / "e.jpg") - rgb8 / 255.0).mean() < 0.05

    deep = (rgb8.astype(np.uint16) * 257 + 3)
    _write(tmp_path / "f16.png", deep)
    np.testing.assert_allclose(S.load_image(tmp_path / "f16.png"), deep / 65535.0, atol=1e-6)

    gray = rgb8[..., 1]
    _write(tmp_path / "g.png", gray)
    out = S.load_image(tmp_path / "g.png")
    np.testing.assert_allclose(out, np.repeat(gray[..., None], 3, 2) / 255.0, atol=1e-6)

    rgba = np.concatenate([rgb8, np.full(rgb8.shape[:2] + (1,), 7, np.uint8)], axis=2)
    _write(tmp_path / "h.png", rgba)
    np.testing.assert_allclose(S.load_image(tmp_path / "h.png"), rgb8 / 255.0, atol=1e-6)  # alpha dropped


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        S.load_image(bad)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        S.load_image(tmp_path / "empty.jpg")


def test_folder_source_recursive_sorted_and_prompts(tmp_path, rgb8):
    for rel in ["b/2.png", "a/1.JPG", "a/deep/3.webp", "c.bmp", "notes.txt", "x.gif"]:
        p = tmp_path / rel
        if rel.endswith((".txt", ".gif")):
            p.write_text("ignored")
        else:
            _write(p, rgb8)
    (tmp_path / "a" / "1.txt").write_text("  a red fox \n")
    src = S.FolderSource(str(tmp_path))
    rel = [p[len(str(tmp_path)) + 1:] for p in src.paths]
    assert rel == sorted(["a/1.JPG", "a/deep/3.webp", "b/2.png", "c.bmp"])
    assert all(S.load_record(src[i])["prompt"] == "" for i in range(len(src)))

    fixed = S.FolderSource(tmp_path, prompt="fixed", prompt_text="a photo")
    assert S.load_record(fixed[0])["prompt"] == "a photo"

    side = S.FolderSource([tmp_path / "a", tmp_path / "b"], prompt="sidecar", prompt_text="fallback")
    prompts = {r["name"].rsplit("/", 1)[-1]: r["prompt"] for r in map(S.load_record, (side[i] for i in range(3)))}
    assert prompts == {"1.JPG": "a red fox", "3.webp": "fallback", "2.png": "fallback"}
    record = S.load_record(side[0])
    assert record["image"].shape == (24, 32, 3) and record["image"].dtype == np.uint8


def test_folder_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        S.FolderSource(tmp_path / "empty")
    with pytest.raises(ValueError, match="prompt mode"):
        S.FolderSource(tmp_path, prompt="caption")
    with pytest.raises(ValueError, match="non-empty"):
        S.FolderSource(tmp_path, prompt="fixed")


def test_paired_folder_source(tmp_path, rgb8):
    for name in ["x/0001", "x/0002", "0003"]:
        _write(tmp_path / "hq" / f"{name}.png", rgb8)
        _write(tmp_path / "lq" / f"{name}.png", rgb8[::4, ::4])
    src = S.PairedFolderSource(tmp_path / "lq", tmp_path / "hq")
    assert len(src) == 3 and src.keys == ["0003", "x/0001", "x/0002"]
    item = src[1]
    assert item["hq"].shape == (24, 32, 3) and item["lq"].shape == (6, 8, 3) and item["name"] == "x/0001"

    _write(tmp_path / "hq" / "only_hq.png", rgb8)
    _write(tmp_path / "lq" / "only_lq.jpg", rgb8)
    with pytest.raises(ValueError) as err:
        S.PairedFolderSource(tmp_path / "lq", tmp_path / "hq")
    assert "only_lq" in str(err.value) and "only_hq" in str(err.value) and "1 LQ without HQ" in str(err.value)


def test_paired_folder_source_strip_and_duplicates(tmp_path, rgb8):
    _write(tmp_path / "hq" / "Canon_001_HR.png", rgb8)
    _write(tmp_path / "lq" / "Canon_001_LR4.png", rgb8)
    with pytest.raises(ValueError, match="strip"):
        S.PairedFolderSource(tmp_path / "lq", tmp_path / "hq")
    src = S.PairedFolderSource(tmp_path / "lq", tmp_path / "hq", strip=r"_(LR\d*|HR)$")
    assert src.keys == ["Canon_001"]
    _write(tmp_path / "hq" / "Canon_001_HR.jpg", rgb8)
    with pytest.raises(ValueError, match="both map to"):
        S.PairedFolderSource(tmp_path / "lq", tmp_path / "hq", strip=r"_(LR\d*|HR)$")


def test_synthetic_source_is_deterministic_and_varied():
    a, b = S.SyntheticSource(4, 48, 64, seed=1), S.SyntheticSource(4, 48, 64, seed=1)
    imgs = [a[i]["image"] for i in range(4)]
    for i in range(4):
        np.testing.assert_array_equal(imgs[i], b[i]["image"])
        assert imgs[i].shape == (48, 64, 3) and imgs[i].dtype == np.uint8
        assert imgs[i].std() > 20  # has content
        gy = np.abs(np.diff(imgs[i].astype(np.float32), axis=0)).mean()
        assert gy > 2  # has edges/texture, not just a smooth ramp
    assert not np.array_equal(imgs[0], imgs[1])
    assert not np.array_equal(S.SyntheticSource(1, 48, 64, seed=2)[0]["image"], imgs[0])
    with pytest.raises(IndexError):
        a[4]


def test_tfds_source_record_mapping_with_an_injected_reader(rgb8):
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR))

    class Reader:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                raise OSError("corrupt ArrayRecord chunk")
            image = png.tobytes() if i == 0 else rgb8
            return {"hr": image, "caption": b"a caption"}

    src = S.TfdsSource("fake/x", image_key="hr", prompt_key="caption", data_source=Reader())
    assert len(src) == 3
    for i in (0, 1):
        rec = S.load_record(src[i])
        np.testing.assert_array_equal(rec["image"], rgb8)
        assert rec["prompt"] == "a caption"
    bad = src[2]
    assert "corrupt ArrayRecord chunk" in bad["error"]
    with pytest.raises(ValueError, match=r"fake/x/train\[2\]"):
        S.load_record(bad)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow_datasets is installed; this checks the message shown without it")
def test_tfds_source_without_tensorflow_datasets_explains():
    with pytest.raises(ImportError, match="tensorflow_datasets"):
        S.TfdsSource("div2k")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None,
                    reason="tensorflow_datasets is not installed (optional dependency)")
def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    """Builds a tiny ArrayRecord dataset with TFDS itself, then reads it through TfdsSource."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 20, 3), dtype=np.uint8) for _ in range(3)]

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(16, 20, 3), encoding_format="png")}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, img in enumerate(images):  # encoded files, so preparing needs no TensorFlow
                path = tmp_path / f"src{i}.png"
                cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                yield i, {"image": str(path)}

    builder = TinyImages(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    src = S.TfdsSource("tiny_images", split="train", data_dir=str(tmp_path))
    got = sorted((S.load_record(src[i])["image"] for i in range(len(src))), key=lambda a: a.tobytes())
    for a, b in zip(got, sorted(images, key=lambda a: a.tobytes())):
        np.testing.assert_array_equal(a, b)
