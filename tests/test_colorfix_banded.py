"""The banded, in-place colour fix of large images (issue 13): the same result as the whole-image programs within
float32 rounding, with a few bands of memory beside the two images."""
import tracemalloc

import numpy as np
import pytest

from jsr.sr import colorfix


def _images(h=301, w=67, seed=0):
    rng = np.random.default_rng(seed)
    sr = rng.random((1, h, w, 3), np.float32) * 0.8 + 0.1
    ref = np.clip(sr * 0.7 + 0.2 + rng.normal(0, 0.05, sr.shape).astype(np.float32), 0, 1).astype(np.float32)
    return sr, ref


# AdaIN's statistics are float64 sums here and float32 reductions in XLA: rounding differences ~1e-7 relative.
# The wavelet bands carry the pyramid's whole reach as context: the same convolutions, so float32 round-off.
@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
@pytest.mark.parametrize("band_rows", [16, 64, 400])  # below the wavelet's 31-row reach, above it, one band
def test_banded_equals_whole_image(method, band_rows):
    sr, ref = _images()
    want = np.asarray(colorfix.color_fix(sr, ref, method, clip=True))
    got = colorfix.color_fix_inplace(sr.copy(), ref, method, band_rows=band_rows)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_in_place_and_inputs_checked():
    sr, ref = _images(64, 32)
    ref_before = ref.copy()
    out = colorfix.color_fix_inplace(sr, ref, "wavelet", band_rows=16)
    assert out is sr and np.array_equal(ref, ref_before)
    with pytest.raises(ValueError, match="writable float32"):
        colorfix.color_fix_inplace(sr.astype(np.float64), ref)
    with pytest.raises(ValueError, match="unknown colour fix"):
        colorfix.color_fix_inplace(sr, ref, "median")
    with pytest.raises(ValueError, match="one shape"):
        colorfix.color_fix_inplace(sr, ref[:, 1:])


def test_memory_is_a_few_bands_not_image_copies():
    sr, ref = _images(2048, 512, seed=1)  # 12 MB per image
    image = sr.nbytes
    for method in ("adain", "wavelet"):
        x = sr.copy()
        tracemalloc.start()
        colorfix.color_fix_inplace(x, ref, method, band_rows=128)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < image / 2, (method, peak, image)  # numpy's allocations beyond the two images
