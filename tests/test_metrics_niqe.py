"""NIQE: the feature pipeline against an independent NumPy reference written here, MATLAB-style imresize against
Pillow and a hand-derived value, the distance formula, parameter files (.npz/.mat) and their errors, and a fitted
pristine model that ranks clean images above blurred and noisy ones.

No reference package can run here: pyiqa needs torchvision (whose PyPI build does not import beside torch's CPU
build) and a dozen other heavy packages, and basicsr imports torchvision at package level; neither is installed.
So the reference below is our own, structured differently from jsr.metrics.niqe on purpose: per-pixel loops for
the resize, explicit padding + sliding windows for the filter, a per-block loop, brute-force argmin on the AGGD
grid with log-gamma ratios, and a linear solve instead of pinv.

The real pristine parameters (basicsr's niqe_pris_params.npz / MATLAB's modelparameters.mat) cannot be fetched
here, so the model-level tests fit parameters from synthetic images with our own feature extractor.

Tolerances: float64 throughout; features agree to rtol 1e-9 (different summation orders differ by ~1e-14 before
being amplified by the MSCN division and the gamma ratios); Pillow's resize works in float32, hence 2e-5 there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio
from scipy import ndimage, special

from jsr.metrics.color import rgb_to_y
from jsr.metrics.niqe import (NIQEParams, aggd_fit, fit_niqe_params, gaussian_window, load_niqe_params,
                              matlab_imresize, niqe, niqe_features, niqe_from_features, save_niqe_params,
                              to_gray255)

# ---------------------------------------------------------------------------------------------------------------
# Independent reference


def _keys_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _ref_resize_axis0(img: np.ndarray, scale: float) -> np.ndarray:
    """One output row at a time: centre in 0-based input coordinates, kernel taps gathered with mirroring."""
    n = img.shape[0]
    out_n = math.ceil(n * scale)
    stretch = min(scale, 1.0)  # antialiasing only when shrinking
    out = np.zeros((out_n,) + img.shape[1:])
    for i in range(out_n):
        c = (i + 0.5) / scale - 0.5
        half = 2.0 / stretch
        acc = np.zeros(img.shape[1:])
        wsum = 0.0
        for j in range(math.floor(c - half) - 1, math.ceil(c + half) + 2):
            w = stretch * _keys_cubic(stretch * (c - j))
            if w == 0.0:
                continue
            jj = j
            while jj < 0 or jj >= n:  # mirror with the edge sample repeated: -1 -> 0, n -> n-1
                jj = -jj - 1 if jj < 0 else 2 * n - 1 - jj
            acc = acc + w * img[jj]
            wsum += w
        out[i] = acc / wsum
    return out


def _ref_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    return np.swapaxes(_ref_resize_axis0(np.swapaxes(_ref_resize_axis0(img, scale), 0, 1), scale), 0, 1)


def _ref_filter(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    r = win.shape[0] // 2
    padded = np.pad(img, r, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, win.shape)
    return np.einsum("ijkl,kl->ij", windows, win)


def _ref_window() -> np.ndarray:
    x = np.arange(-3, 4)
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return g / g.sum()


_GRID = np.linspace(0.2, 10.0, 9801)
_RGRID = np.exp(2 * special.gammaln(2 / _GRID) - special.gammaln(1 / _GRID) - special.gammaln(3 / _GRID))


def _ref_aggd(v: np.ndarray) -> tuple[float, float, float]:
    v = v.ravel()
    left = v[v < 0]
    right = v[v > 0]
    if left.size == 0 or right.size == 0:
        return math.nan, math.nan, math.nan
    lstd = math.sqrt(np.mean(left**2))
    rstd = math.sqrt(np.mean(right**2))
    g = lstd / rstd
    r = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
    rn = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    a = _GRID[np.argmin((_RGRID - rn) ** 2)]
    k = math.exp(0.5 * (special.gammaln(1 / a) - special.gammaln(3 / a)))
    return a, lstd * k, rstd * k


def _ref_block_feats(block: np.ndarray) -> list[float]:
    a, bl, br = _ref_aggd(block)
    out = [a, (bl + br) / 2]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        shifted = np.roll(np.roll(block, dy, axis=0), dx, axis=1)
        a, bl, br = _ref_aggd(block * shifted)
        mean = (br - bl) * math.exp(special.gammaln(2 / a) - special.gammaln(1 / a))
        out += [a, mean, bl, br]
    return out


def _ref_features(gray: np.ndarray, bs: int = 96) -> np.ndarray:
    nh, nw = gray.shape[0] // bs, gray.shape[1] // bs
    img = gray[: nh * bs, : nw * bs].astype(np.float64)
    per_scale = []
    for scale in (1, 2):
        win = _ref_window()
        mu = _ref_filter(img, win)
        sd = np.sqrt(np.abs(_ref_filter(img * img, win) - mu * mu))
        m = (img - mu) / (sd + 1)
        b = bs // scale
        rows = []
        for by in range(nh):
            for bx in range(nw):
                rows.append(_ref_block_feats(m[by * b:(by + 1) * b, bx * b:(bx + 1) * b]))
        per_scale.append(np.array(rows))
        img = _ref_imresize(img, 0.5)
    return np.concatenate(per_scale, axis=1)


def _ref_niqe(feats: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray) -> float:
    ok = ~np.isnan(feats).any(axis=1)
    mu = np.nanmean(feats, axis=0)
    c = feats[ok] - feats[ok].mean(axis=0)
    cov = c.T @ c / (ok.sum() - 1)
    d = mu_p - mu
    return math.sqrt(d @ np.linalg.solve((cov_p + cov) / 2, d))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic images


def _natural(seed: int, h: int, w: int) -> np.ndarray:
    """A [h, w, 3] image in [0, 1] with a 1/f amplitude spectrum (natural-image-like) plus hard-edged discs."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))) / f**1.1
        chans.append(np.real(np.fft.ifft2(spec)))
    img = np.stack(chans, axis=-1)
    img = 0.6 * img[..., :1] + 0.4 * img  # correlated channels, as in photos
    img = (img - img.mean()) / (4 * img.std()) + 0.5
    yy, xx = np.mgrid[:h, :w]
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 40)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        # Textured, not flat: on a flat patch the MSCN coefficients are rounding noise (~1e-13) whose signs, and
        # so the AGGD fits, depend on summation order; every implementation (MATLAB's included) differs there.
        img[disc] = rng.uniform(0.1, 0.9, 3) + 0.3 * (img[disc] - 0.5)
    return np.clip(img, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# imresize


def test_imresize_hand_value():
    # MATLAB: imresize([0 1 2 3], 0.5) -> [0.4609375, 2.5390625]. By hand: the first output sits at 1.5 (1-based);
    # kernel 0.5 * cubic(0.5 d) at d = 3.5, 2.5, 1.5, 0.5 is -3/256, -9/256, 29/256, 111/256 (and mirrored), over
    # the mirrored samples 2, 1, 0, 0 | 1, 2, 3, 3: (-6 - 9 + 0 + 0 + 111 + 58 - 27 - 9) / 256 = 118 / 256.
    x = np.array([[0.0, 1, 2, 3]] * 4)
    out = matlab_imresize(x, 0.5)
    np.testing.assert_allclose(out, [[118 / 256, 2.5390625]] * 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_imresize_matches_pillow_on_mirrored_image(scale):
    # Pillow's bicubic is the same a = -0.5 kernel with the same antialiasing, but it renormalises at the image
    # border instead of mirroring. Padding the image symmetrically (by an even amount, which keeps the sampling
    # grid aligned) and cropping the result makes the two agree everywhere.
    rng = np.random.default_rng(0)
    x = rng.random((36, 50)) * 255
    pad = 8
    padded = np.pad(x, pad, mode="symmetric").astype(np.float32)
    h, w = padded.shape
    size = (int(round(w * scale)), int(round(h * scale)))
    ref = np.asarray(Image.fromarray(padded, mode="F").resize(size, Image.Resampling.BICUBIC), np.float64)
    k = int(pad * scale)
    ref = ref[k:-k, k:-k]
    ours = matlab_imresize(x, scale)
    assert ours.shape == ref.shape == (math.ceil(36 * scale), math.ceil(50 * scale))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * 255)


def test_imresize_matches_loop_reference_and_channels():
    rng = np.random.default_rng(1)
    x = rng.random((22, 17, 2))  # odd width: ceil(8.5) = 9 columns
    ours = matlab_imresize(x, 0.5)
    assert ours.shape == (11, 9, 2)
    np.testing.assert_allclose(ours, _ref_imresize(x, 0.5), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Features


def test_gaussian_window():
    np.testing.assert_allclose(gaussian_window(), _ref_window(), rtol=1e-14)
    np.testing.assert_allclose(gaussian_window().sum(), 1.0, rtol=1e-15)


def test_aggd_fit_matches_bruteforce():
    rng = np.random.default_rng(2)
    rows = []
    for shape in (0.4, 0.8, 1.0, 2.0, 5.0):
        s = np.sign(rng.standard_normal(2000)) * rng.gamma(1 / shape, 1.0, 2000) ** (1 / shape)
        rows.append(np.where(s < 0, 0.6 * s, 1.3 * s))  # asymmetric
    # Evenly spread samples (the uniform law, shape -> inf): r = 0.75 lies beyond the grid's r(10) = 0.7405, so
    # alpha must clamp to the grid's end.
    rows.append(np.linspace(-1, 1, 2000))
    rows.append(np.concatenate([np.zeros(1999), [1.0]]))  # no negative samples: NaN
    x = np.stack(rows)
    alpha, bl, br = aggd_fit(x)
    for i, row in enumerate(x):
        ra, rbl, rbr = _ref_aggd(row)
        np.testing.assert_allclose([alpha[i], bl[i], br[i]], [ra, rbl, rbr], rtol=1e-12, equal_nan=True)
    assert alpha[len(rows) - 2] == 10.0 and np.isnan(alpha[-1])
    # The fit recovers the shape of generalised Gaussian samples (to the sampling error of 2000 draws).
    assert abs(alpha[1] - 0.8) < 0.15 and abs(alpha[3] - 2.0) < 0.3


def test_features_match_reference():
    img = _natural(3, 200, 300)  # 2 x 3 blocks after cropping 200x300 to 192x288
    gray = to_gray255(img)
    feats, sharp = niqe_features(gray)
    assert feats.shape == (6, 36) and sharp.shape == (6,)
    np.testing.assert_allclose(feats, _ref_features(gray), rtol=1e-9, atol=1e-12)
    # Sharpness: the mean local standard deviation per block (MATLAB's computemean over sigma).
    win = _ref_window()
    g = gray[:192, :288]
    mu = _ref_filter(g, win)
    sd = np.sqrt(np.abs(_ref_filter(g * g, win) - mu * mu))
    ref_sharp = [sd[y * 96:(y + 1) * 96, x * 96:(x + 1) * 96].mean() for y in range(2) for x in range(3)]
    np.testing.assert_allclose(sharp, ref_sharp, rtol=1e-10)


def test_nan_rows_are_dropped():
    # A block without negative (or positive) coefficients has NaN features (see test_aggd_fit_matches_bruteforce);
    # MATLAB's nanmean keeps the row's other columns for the mean, nancov drops the whole row.
    feats, _ = niqe_features(to_gray255(_natural(4, 192, 288)))
    feats[0, 5] = np.nan
    params = _fake_params(seed=5)
    got = niqe_from_features(feats, params)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _ref_niqe(feats, *params), rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Score


def _fake_params(seed: int) -> NIQEParams:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((36, 60))
    return NIQEParams(rng.standard_normal(36), a @ a.T / 60 + 0.1 * np.eye(36))


def test_niqe_formula_matches_reference():
    img = _natural(6, 288, 384)  # 12 blocks
    params = _fake_params(seed=7)
    got = niqe(img, params)
    assert got.shape == ()
    feats = _ref_features(to_gray255(img))
    np.testing.assert_allclose(got, _ref_niqe(feats, *params), rtol=1e-9)


def test_fitted_model_ranks_distortions():
    pristine = [_natural(100 + i, 384, 384) for i in range(8)]
    params = fit_niqe_params(pristine)
    assert params.mu.shape == (36,) and params.cov.shape == (36, 36)
    np.testing.assert_allclose(params.cov, params.cov.T)
    assert np.linalg.eigvalsh(params.cov).min() > -1e-10
    clean = _natural(200, 288, 288)
    blurred = ndimage.gaussian_filter(clean, sigma=(2.0, 2.0, 0))
    noisy = np.clip(clean + 0.08 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1)
    scores = niqe(np.stack([clean, blurred, noisy]), params)
    assert scores[0] < scores[1] and scores[0] < scores[2], scores


def test_fit_keeps_only_sharp_blocks():
    img = _natural(8, 192, 192)
    img[96:, 96:] = ndimage.gaussian_filter(img[96:, 96:], sigma=(4, 4, 0))  # one blurry block
    feats, sharp = niqe_features(to_gray255(img))
    assert sharp.argmin() == 3
    keep = sharp > 0.75 * sharp.max()
    assert not keep[3]
    # Four copies keep enough rows for a covariance; the model must equal the mean/cov of the kept rows only.
    params = fit_niqe_params([img] * 4)
    rows = np.concatenate([feats[keep]] * 4)
    np.testing.assert_allclose(params.mu, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(params.cov, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)


def test_batch_crop_and_color():
    imgs = np.stack([_natural(9, 200, 200), _natural(10, 200, 200)]).astype(np.float32)
    params = _fake_params(seed=11)
    batch = niqe(imgs, params)
    assert batch.shape == (2,)
    np.testing.assert_allclose(batch, [niqe(imgs[0], params), niqe(imgs[1], params)], rtol=0)
    mixed = niqe([imgs[0], imgs[1][:, :192]], params)  # a list may hold different sizes
    assert mixed.shape == (2,) and mixed[0] == batch[0]
    # crop_border trims the grey image before blocking.
    cropped = niqe(imgs[0], params, crop_border=4)
    feats, _ = niqe_features(to_gray255(imgs[0])[4:-4, 4:-4])
    np.testing.assert_allclose(cropped, niqe_from_features(feats, params), rtol=0)
    # "ycbcr" is the luma of jsr.metrics.color (the PSNR-Y helper), rounded; "yiq" differs from it.
    y = np.round(np.asarray(rgb_to_y(imgs[0]), np.float64)[..., 0])
    np.testing.assert_allclose(to_gray255(imgs[0], "ycbcr"), y, atol=1.0)  # f32 vs f64 at .5 boundaries
    assert np.mean(to_gray255(imgs[0], "ycbcr") == y) > 0.999
    assert not np.allclose(niqe(imgs[0], params, color="ycbcr"), niqe(imgs[0], params, color="yiq"))
    # Grey input [H, W, 1] is used as it is (times 255).
    grey = imgs[0][..., :1]
    np.testing.assert_array_equal(to_gray255(grey), np.round(grey[..., 0].astype(np.float64) * 255))


def test_input_errors():
    params = _fake_params(seed=12)
    with pytest.raises(ValueError, match="at least 96x96"):
        niqe(np.zeros((80, 200, 3)), params)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        niqe(np.full((96, 96, 3), 200.0), params)
    with pytest.raises(ValueError, match="need at least 2"):
        niqe(_natural(13, 100, 100), params)  # one block: no covariance
    with pytest.raises(ValueError, match="color"):
        niqe(_natural(13, 192, 192), params, color="lab")


# ---------------------------------------------------------------------------------------------------------------
# Parameter files


def test_param_files_roundtrip(tmp_path):
    params = _fake_params(seed=14)
    img = _natural(15, 192, 288)
    want = niqe(img, params)
    # basicsr's layout: float64 arrays plus the Gaussian window it also stores.
    np.savez(tmp_path / "niqe_pris_params.npz", mu_pris_param=params.mu, cov_pris_param=params.cov,
             gaussian_window=gaussian_window())
    # The MATLAB release's layout: mu as a 1x36 row vector.
    sio.savemat(tmp_path / "modelparameters.mat", {"mu_prisparam": params.mu[None], "cov_prisparam": params.cov})
    save_niqe_params(tmp_path / "ours.npz", params)
    for name in ("niqe_pris_params.npz", "modelparameters.mat", "ours.npz"):
        loaded = load_niqe_params(tmp_path / name)
        np.testing.assert_array_equal(loaded.mu, params.mu)
        np.testing.assert_array_equal(loaded.cov, params.cov)
        assert loaded.mu.dtype == np.float64
        np.testing.assert_allclose(niqe(img, loaded), want, rtol=0)
    (tmp_path / "params.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unknown extension"):
        load_niqe_params(tmp_path / "params.txt")


def test_param_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="niqe_pris_params.npz"):
        load_niqe_params(tmp_path / "absent.npz")
    params = _fake_params(seed=16)
    np.savez(tmp_path / "keys.npz", mu=params.mu, sigma=params.cov)
    with pytest.raises(ValueError, match=r"want keys.*found \['mu', 'sigma'\]"):
        load_niqe_params(tmp_path / "keys.npz")
    np.savez(tmp_path / "shape.npz", mu_pris_param=params.mu[:18], cov_pris_param=params.cov)
    with pytest.raises(ValueError, match="36 means"):
        load_niqe_params(tmp_path / "shape.npz")
    asym = params.cov.copy()
    asym[0, 1] += 1.0
    np.savez(tmp_path / "asym.npz", mu_pris_param=params.mu, cov_pris_param=asym)
    with pytest.raises(ValueError, match="not symmetric"):
        load_niqe_params(tmp_path / "asym.npz")
    bad = params.mu.copy()
    bad[3] = np.nan
    np.savez(tmp_path / "nan.npz", mu_pris_param=bad, cov_pris_param=params.cov)
    with pytest.raises(ValueError, match="NaN"):
        load_niqe_params(tmp_path / "nan.npz")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        load_niqe_params(tmp_path / "junk.mat")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_niqe_params(tmp_path / "junk.npz")
