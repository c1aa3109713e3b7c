"""Tiled == untiled for stand-in maps (pointwise: exact; local convolutions: to the Gaussian weights' leak),
tile grids, padding. The real SD VAE/UNet tiling error is measured in tests/test_infer.py on tiny random models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.sr import tiling


@pytest.mark.parametrize("size,tile,overlap,align", [
    (96, 32, 8, 1), (100, 32, 16, 1), (37, 16, 4, 1), (256, 64, 16, 8), (200, 64, 20, 8), (64, 64, 16, 8),
    (40, 64, 16, 8), (1000, 96, 32, 1)])
def test_tile_starts_cover_with_overlap(size, tile, overlap, align):
    starts = tiling.tile_starts(size, tile, overlap, align)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    assert all(s % align == 0 for s in starts)
    assert all(b > a for a, b in zip(starts, starts[1:]))
    # Neighbours overlap by at least the request; and no more tiles than needed at that overlap.
    assert all(a + t - b >= overlap for a, b in zip(starts, starts[1:]))
    if size > tile:
        stride = (tile // align - math.ceil(overlap / align)) * align
        assert len(starts) == math.ceil((size - tile) / stride) + 1


def test_tile_starts_errors():
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(100, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiling.tile_starts(100, 32, 8, align=8)


def test_gaussian_weights_shape_and_symmetry():
    w = tiling.gaussian_weights(8, 13)
    assert w.shape == (8, 13) and w.dtype == np.float32
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    assert w[3:5, 6].min() == w.max()  # peak at the centre
    assert w.min() > 0  # every output pixel of a tile keeps a (tiny) weight: no division by zero anywhere


def _conv_stack(key, layers, cin=3, cout=4):
    """A random 3x3 'SAME' conv stack with tanh: output depends on inputs within ``layers`` pixels."""
    ws = []
    c = cin
    for i in range(layers):
        key, k = jax.random.split(key)
        o = cout if i == layers - 1 else 8
        ws.append(jax.random.normal(k, (3, 3, c, o)) / np.sqrt(9 * c))
        c = o

    @jax.jit
    def fn(x):
        for i, w in enumerate(ws):
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jnp.tanh(x) if i < len(ws) - 1 else x
        return x
    return fn


def test_pointwise_map_tiles_exactly():
    x = np.random.default_rng(0).normal(size=(2, 45, 70, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    fn = jax.jit(lambda t: jnp.tanh(t @ w))
    full = np.asarray(fn(x))
    tiled = tiling.tiled_map(fn, x, 16, 5)
    # Every tile gives the same value at a pixel, so the weighted mean is that value up to f32 rounding.
    np.testing.assert_allclose(tiled, full, atol=1e-6, rtol=1e-6)


def test_local_conv_tiles_within_gaussian_leak():
    r = 3
    fn = _conv_stack(jax.random.key(0), r)
    x = np.random.default_rng(2).normal(size=(1, 61, 83, 3)).astype(np.float32)
    full = np.asarray(fn(x))
    tile, overlap = 32, 16
    tiled = tiling.tiled_map(fn, x, tile, overlap)
    # A tile is wrong only within r pixels of its inner borders, where its Gaussian weight is at most
    # exp(-((T/2 - r)/T)^2 / 0.02) = 2.6e-4 of its centre; with overlap >= 2r a neighbour sees that pixel with
    # full context at weight >= exp(-(r/T)^2 / 0.02) ~ 0.64 (per axis; corners square both). So the error is
    # below ~4 * 2.6e-4 / 0.64^2 ~ 2.6e-3 of the wrong tiles' error (O(1) here): 1e-3 * max|f| in practice.
    scale = np.abs(full).max()
    err = np.abs(tiled - full).max()
    assert err < 2e-3 * scale, err
    # Pixels seen by one tile only (away from overlaps) are exactly that tile's output: exact there.
    starts = tiling.tile_starts(83, tile, overlap)
    lone = [c for c in range(83) if sum(s <= c < s + tile for s in starts) == 1]
    ystarts = tiling.tile_starts(61, tile, overlap)
    lone_y = [c for c in range(61) if sum(s <= c < s + tile for s in ystarts) == 1]
    inner = [c for c in lone if all(abs(c - s) >= r and abs(c - (s + tile - 1)) >= r for s in starts)]
    inner_y = [c for c in lone_y if all(abs(c - s) >= r and abs(c - (s + tile - 1)) >= r for s in ystarts)]
    if inner and inner_y:
        np.testing.assert_allclose(tiled[:, inner_y][:, :, inner], full[:, inner_y][:, :, inner], atol=1e-5)
    # Without tiling pressure (tile >= image) it is one call: bit-identical.
    np.testing.assert_array_equal(tiling.tiled_map(fn, x, 128, 16), full)


def test_tiles_per_call_batches_identically():
    fn = _conv_stack(jax.random.key(1), 2)
    x = np.random.default_rng(3).normal(size=(2, 40, 56, 3)).astype(np.float32)
    a = tiling.tiled_map(fn, x, 16, 4, tiles_per_call=1)
    b = tiling.tiled_map(fn, x, 16, 4, tiles_per_call=3)  # 3x4 tiles: the last batch is padded by repetition
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_decode_shaped_maps():
    """Scale 1/8 (encoder-like: 8x8 patch mean, pointwise) and 8 (decoder-like: pointwise, nearest x8) tile
    exactly: pixel tiles start on multiples of 8, so each patch lies in one tile whole."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 72, 104, 3)).astype(np.float32)
    w = rng.normal(size=(3, 4)).astype(np.float32)

    def enc(t):
        b, h, ww, c = t.shape
        return jnp.tanh(jnp.mean(t.reshape(b, h // 8, 8, ww // 8, 8, c), axis=(2, 4)) @ w)

    def dec(z):
        return jnp.repeat(jnp.repeat(jnp.tanh(z[..., :3]), 8, axis=1), 8, axis=2)

    z_full = np.asarray(enc(x))
    z_tiled = tiling.tiled_encode(enc, x, tile=32, overlap=12)  # overlap rounds up to 16
    np.testing.assert_allclose(z_tiled, z_full, atol=1e-6)
    x_full = np.asarray(dec(z_full))
    np.testing.assert_allclose(tiling.tiled_decode(dec, z_full, tile=4, overlap=2), x_full, atol=1e-6)


def test_wrong_fn_output_shape_is_reported():
    x = np.zeros((1, 40, 40, 3), np.float32)
    with pytest.raises(ValueError, match="expected"):
        tiling.tiled_map(lambda t: t[:, ::2], x, 16, 4)


def test_pad_to_multiple_and_crop_round_trip():
    x = np.random.default_rng(5).uniform(size=(1, 37, 53, 3)).astype(np.float32)
    p, size = tiling.pad_to_multiple(x, 8)
    assert p.shape == (1, 40, 56, 3) and size == (37, 53)
    np.testing.assert_array_equal(tiling.crop_to(p, size), x)
    np.testing.assert_array_equal(p[:, 37, :53], x[:, 35])  # mirror reflection about the last row
    tiny = x[:, :3, :2]
    p, size = tiling.pad_to_multiple(tiny, 8)  # too small to reflect: edge replication
    assert p.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(p[:, 7, 7], tiny[:, 2, 1])
    same, size = tiling.pad_to_multiple(p, 8)
    assert same is p and size == (8, 8)
