"""jsr.data.images: the one image reader. Inference (jsr.infer), training data (jsr.data.sources, file and pipeline
paths) and FID folders (jsr.metrics.fid) read one file to one array: 8-bit and 16-bit PNG, JPEG with an EXIF
rotation, RGBA, greyscale; plus the writer/quantiser round trip, the folder listing and the error messages."""
import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from jsr import infer as cli
from jsr.data import degradation, images, sources
from jsr.metrics import fid


def _readers(path):
    """The same file through every caller: {caller: float32 [H, W, 3]}."""
    return {
        "infer.read_image": cli.read_image(path),
        "sources.load_image": sources.load_image(path),
        "pipeline (load_record + to_float01)": sources.to_float01(sources.load_record({"path": str(path)})["image"]),
        "fid folder reader": next(fid._load_all([path])),
    }


@pytest.fixture
def rgb8():
    return sources.synthetic_image(0, 2, 20, 28)  # [20, 28, 3] uint8, edges and texture


def _jpeg_with_orientation(path, rgb, orientation):
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _cases(tmp_path, rgb8):
    """{file: expected float array (None: checked against Pillow below)}."""
    deep = rgb8.astype(np.uint16) * 257 + 5
    grey = rgb8[..., 1]
    grey16 = grey.astype(np.uint16) * 250
    rgba = np.concatenate([rgb8, np.full(rgb8.shape[:2] + (1,), 9, np.uint8)], axis=2)
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png")
    cv2.imwrite(str(tmp_path / "rgb16.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    _jpeg_with_orientation(tmp_path / "rot6.jpg", rgb8, 6)
    return {
        "rgb8.png": rgb8 / 255.0,
        "rgb16.png": deep / 65535.0,
        "rgba.png": rgb8 / 255.0,
        "grey.png": np.repeat(grey[..., None], 3, 2) / 255.0,
        "grey16.png": np.repeat(grey16[..., None], 3, 2) / 65535.0,
        "rot6.jpg": None,
    }


def test_every_caller_reads_the_same_array(tmp_path, rgb8):
    for name, want in _cases(tmp_path, rgb8).items():
        path = tmp_path / name
        got = _readers(path)
        first = got["infer.read_image"]
        assert first.dtype == np.float32 and first.ndim == 3 and first.shape[2] == 3, name
        for caller, arr in got.items():
            np.testing.assert_array_equal(arr, first, err_msg=f"{name}: {caller}")
        assert cli.image_size(path) == first.shape[:2], name
        if want is not None:
            np.testing.assert_allclose(first, want, atol=1e-6, err_msg=name)


def test_exif_rotation_applied(tmp_path, rgb8):
    path = _jpeg_with_orientation(tmp_path / "rot6.jpg", rgb8, 6)
    img = images.read_image(path)
    assert img.shape == (28, 20, 3) and images.image_size(path) == (28, 20)  # orientation 6: 90 degrees, W x H
    with Image.open(path) as im:  # Pillow's reading of the same file, as a reference for the orientation
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.float32) / 255.0
    assert np.abs(img - ref).max() <= 1.5 / 255  # same pixels up to the two libjpeg builds' rounding


def test_write_read_round_trip_is_quantize_8bit(tmp_path):
    x = np.random.default_rng(0).uniform(-0.1, 1.1, size=(9, 13, 3)).astype(np.float32)
    images.write_image(tmp_path / "sub" / "x.png", x)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "x.png"]  # no temporary file left
    np.testing.assert_array_equal(images.read_image(tmp_path / "sub" / "x.png"), images.quantize_8bit(x))
    assert degradation.quantize_8bit is images.quantize_8bit


def test_list_images_and_extensions(tmp_path, rgb8):
    for rel in ("b.PNG", "a.jpg", "sub/c.webp", "d.ppm", "notes.txt", "e.gif"):
        p = tmp_path / rel
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    assert [p.name for p in images.list_images(tmp_path, recursive=False)] == ["a.jpg", "b.PNG", "d.ppm"]
    assert [p.name for p in images.list_images(tmp_path)] == ["a.jpg", "b.PNG", "d.ppm", "c.webp"]
    assert fid.list_images(tmp_path) == images.list_images(tmp_path, recursive=False)
    found, failed = cli.collect_inputs([tmp_path])
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "d.ppm"] and not failed
    assert cli.IMAGE_EXTS == sources.IMAGE_EXTENSIONS == images.IMAGE_EXTENSIONS


def test_errors_name_the_file(tmp_path, rgb8):
    Image.fromarray(rgb8).save(tmp_path / "ok.png")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name, match in (("cut.png", "not a readable image"), ("empty.jpg", "empty file"),
                        ("text.png", "not a readable image"), ("missing.png", "not a readable image")):
        with pytest.raises(images.BadImageError, match=match) as e:
            images.read_image(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and isinstance(e.value, ValueError)
    assert cli.BadImageError is images.BadImageError
    with pytest.raises(images.BadImageError, match="empty file"):
        images.image_size(tmp_path / "empty.jpg")
