"""NIQE (Mittal, Soundararajan and Bovik 2013, "Making a 'completely blind' image quality analyzer").

The MATLAB release's algorithm, as basicsr and pyiqa reproduce it for the SR literature:

1. The image becomes one channel on the 0..255 scale, rounded to integers (what an 8-bit grey image holds), and is
   cropped to whole 96x96 blocks.
2. At each of two scales (the image, then MATLAB's ``imresize(im, 0.5)``: bicubic with antialiasing), MSCN
   coefficients ``(I - mu) / (sigma + 1)`` are computed with a 7x7 Gaussian window (sigma 7/6, edge replication).
3. Each block (96x96, then 48x48) gives 18 numbers: an AGGD fit of its MSCN coefficients (shape, mean of the two
   scales) and, for the products of each coefficient with its right, lower, lower-right and lower-left neighbour
   (circular within the block), an AGGD fit (shape, mean, left scale, right scale). Both scales: 36 per block.
   The AGGD fit is moment matching on the grid ``alpha = 0.2:0.001:10``.
4. A Gaussian is fitted to the blocks' features (NaN rows dropped) and compared with the pristine model
   ``(mu_p [36], S_p [36, 36])``: ``NIQE = sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu))``. Lower is better.

Everything runs in float64 NumPy/SciPy on the host (a metric, never differentiated; ~0.3 s for 512x512).
On perfectly flat areas the MSCN coefficients are rounding noise (~1e-13) whose signs decide the AGGD fits, so
there every implementation (MATLAB's, basicsr's, pyiqa's, this one) gives slightly different numbers.

Pristine parameters are not bundled: pass the file that basicsr ships (``niqe_pris_params.npz``) or the MATLAB
release's ``modelparameters.mat`` to :func:`load_niqe_params`, or fit your own with :func:`fit_niqe_params`.

Grey conversion (``color``): ``"yiq"`` (0.299 R + 0.587 G + 0.114 B, pyiqa's default and MATLAB's ``rgb2gray`` up
to its 4th decimal) or ``"ycbcr"`` (BT.601 studio-swing luma in [16, 235], basicsr's ``calculate_niqe``). The two
give different scores; papers that evaluate with pyiqa (OSEDiff, PiSA-SR and their successors) use ``"yiq"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from scipy import ndimage, special

from jsr.metrics.color import BT601_Y_OFFSET, BT601_Y_WEIGHTS

BLOCK_SIZE = 96
N_FEATURES = 36
SHARPNESS_THRESHOLD = 0.75  # the MATLAB release's default when fitting a pristine model
_YIQ_Y = (0.299, 0.587, 0.114)
# (rows, columns) circular shifts of the neighbour products: right, below, below-right, below-left neighbour.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
# The moment-matching grid of the MATLAB code (``gam = 0.2:0.001:10``) and its ratio
# ``r(a) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))``, which increases strictly with ``a`` on this range.
_GAM = 0.2 + 0.001 * np.arange(9801)
_R_GAM = special.gamma(2.0 / _GAM) ** 2 / (special.gamma(1.0 / _GAM) * special.gamma(3.0 / _GAM))


class NIQEParams(NamedTuple):
    """The pristine multivariate Gaussian: ``mu`` [36] and ``cov`` [36, 36], float64."""

    mu: np.ndarray
    cov: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic)


def _cubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution kernel with a = -0.5, MATLAB's "bicubic".
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def imresize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The [out_len, in_len] float64 matrix of MATLAB's 1-D bicubic ``imresize`` along one axis.

    Output sample ``x`` (1-based) sits at input coordinate ``u = x / scale + (1 - 1 / scale) / 2``. When shrinking
    with antialiasing the kernel is stretched by ``1 / scale`` (and scaled by ``scale``); weights are normalised
    per output sample and samples outside the image are mirrored (``[1..n, n..1]``), as MATLAB does.
    """
    width = 4.0
    stretch = scale < 1 and antialias
    if stretch:
        width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input positions
    d = u[:, None] - idx
    w = scale * _cubic(scale * d) if stretch else _cubic(d)
    w = w / np.sum(w, axis=1, keepdims=True)
    k = np.mod(idx - 1, 2 * in_len).astype(np.int64)
    src = np.where(k < in_len, k, 2 * in_len - 1 - k)  # 0-based, mirrored with the edge sample repeated
    mat = np.zeros((out_len, in_len), np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), src.ravel()), w.ravel())
    return mat


def matlab_imresize(img: np.ndarray, scale: float, *, antialias: bool = True) -> np.ndarray:
    """MATLAB's ``imresize(img, scale)`` (bicubic) for floating-point images.

    Args:
      img: [H, W] or [H, W, C], any range (no clipping, as MATLAB for ``double`` input).
      scale: the same factor for both axes; the output is ``ceil(scale * H) x ceil(scale * W)``.
      antialias: stretch the kernel when shrinking (MATLAB's default).
    Returns:
      float64 array, rows resized first and then columns (MATLAB's order for equal factors).
    """
    img = np.asarray(img, np.float64)
    h, w = img.shape[:2]
    mh = imresize_matrix(h, int(np.ceil(scale * h)), scale, antialias)
    mw = imresize_matrix(w, int(np.ceil(scale * w)), scale, antialias)
    out = np.tensordot(mh, img, axes=(1, 0))
    out = np.tensordot(mw, out, axes=(1, 1))  # -> [W', H', ...]
    return np.swapaxes(out, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Features


def gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """MATLAB's ``fspecial('gaussian', size, sigma)``: a [size, size] float64 window that sums to 1."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma * sigma))
    g[g < np.finfo(np.float64).eps * g.max()] = 0.0
    return g / g.sum()


def mscn(img: np.ndarray, window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients of a grey image on the 0..255 scale.

    Args:
      img: [H, W] float.
      window: the local averaging window (default :func:`gaussian_window`), applied with edge replication.
    Returns:
      ``(coefficients, sigma)``: ``(img - mu) / (sigma + 1)`` and the local standard deviation ``sigma``, both
      [H, W] float64.
    """
    img = np.asarray(img, np.float64)
    win = gaussian_window() if window is None else window
    mu = ndimage.correlate(img, win, mode="nearest")
    # abs(): E[x^2] - mu^2 can come out a hair below zero on flat regions.
    sigma = np.sqrt(np.abs(ndimage.correlate(img * img, win, mode="nearest") - mu * mu))
    return (img - mu) / (sigma + 1.0), sigma


def _nearest_alpha(r: np.ndarray) -> np.ndarray:
    # argmin_a (r_gam(a) - r)^2 with the first index on ties, by bisection on the increasing r_gam.
    i = np.searchsorted(_R_GAM, np.where(np.isfinite(r), r, 0.0))
    lo = np.clip(i - 1, 0, _GAM.size - 1)
    hi = np.clip(i, 0, _GAM.size - 1)
    pick = np.where(np.abs(_R_GAM[lo] - r) <= np.abs(_R_GAM[hi] - r), lo, hi)
    return np.where(np.isfinite(r), _GAM[pick], np.nan)


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching fit of an asymmetric generalised Gaussian to each row of ``x``.

    Args:
      x: [B, n] float samples (one row per block).
    Returns:
      ``(alpha, beta_left, beta_right)``, each [B] float64. A row without negative or positive samples (a flat
      block) gives NaN, which :func:`niqe_from_features` drops, as MATLAB's ``nanmean``/``nancov`` do.
    """
    x = np.asarray(x, np.float64)
    neg, pos = x < 0, x > 0
    sq = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        left_std = np.sqrt(np.sum(np.where(neg, sq, 0.0), axis=1) / np.sum(neg, axis=1))
        right_std = np.sqrt(np.sum(np.where(pos, sq, 0.0), axis=1) / np.sum(pos, axis=1))
        g = left_std / right_std
        rhat = np.mean(np.abs(x), axis=1) ** 2 / np.mean(sq, axis=1)
        rhatnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
        alpha = _nearest_alpha(rhatnorm)
        ratio = np.sqrt(special.gamma(1.0 / alpha) / special.gamma(3.0 / alpha))
    return alpha, left_std * ratio, right_std * ratio


def block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each block of MSCN coefficients.

    Args:
      blocks: [B, h, w] MSCN coefficients.
    Returns:
      [B, 18] float64: ``alpha, (beta_l + beta_r) / 2`` of the coefficients, then for each neighbour product
      (right, below, below-right, below-left; circular within the block) ``alpha, mean, beta_l, beta_r`` with
      ``mean = (beta_r - beta_l) Gamma(2/alpha) / Gamma(1/alpha)``.
    """
    blocks = np.asarray(blocks, np.float64)
    flat = blocks.reshape(blocks.shape[0], -1)
    alpha, bl, br = aggd_fit(flat)
    cols = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        pair = flat * np.roll(blocks, shift, axis=(1, 2)).reshape(flat.shape)
        alpha, bl, br = aggd_fit(pair)
        with np.errstate(invalid="ignore"):
            mean = (br - bl) * special.gamma(2.0 / alpha) / special.gamma(1.0 / alpha)
        cols += [alpha, mean, bl, br]
    return np.stack(cols, axis=1)


def _blocks(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    return img.reshape(h // size, size, w // size, size).transpose(0, 2, 1, 3).reshape(-1, size, size)


def niqe_features(gray: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per-block NIQE features of one grey image.

    Args:
      gray: [H, W] on the 0..255 scale (already rounded if you follow the reference protocol; see
        :func:`to_gray255`); at least ``block_size`` in each dimension. The image is cropped to whole blocks.
      block_size: block side at full scale (96 in the paper); must be even.
    Returns:
      ``(features, sharpness)``: [n_blocks, 36] float64 (18 at full scale, then 18 at half scale; blocks in
      row-major order) and [n_blocks] the mean local standard deviation of each block at full scale (what the
      MATLAB code uses to pick sharp blocks when fitting a pristine model).
    """
    gray = np.asarray(gray, np.float64)
    if gray.ndim != 2:
        raise ValueError(f"niqe_features: want one [H, W] grey image, got shape {gray.shape}")
    if block_size % 2:
        raise ValueError(f"niqe_features: block_size must be even (blocks are halved at scale 2), got {block_size}")
    nh, nw = gray.shape[0] // block_size, gray.shape[1] // block_size
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs images of at least {block_size}x{block_size} pixels, got "
                         f"{gray.shape[0]}x{gray.shape[1]}")
    img = gray[: nh * block_size, : nw * block_size]
    feats = []
    sharpness = None
    for scale in (1, 2):
        coeffs, sigma = mscn(img)
        feats.append(block_features(_blocks(coeffs, block_size // scale)))
        if scale == 1:
            sharpness = _blocks(sigma, block_size).mean(axis=(1, 2))
            img = matlab_imresize(img, 0.5)
    return np.concatenate(feats, axis=1), sharpness


def _gaussian_fit(feats: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    # MATLAB's nanmean (per column) and nancov (rows with any NaN dropped).
    valid = ~np.isnan(feats).any(axis=1)
    if valid.sum() < 2:
        raise ValueError(f"{what}: {int(valid.sum())} block(s) with finite features, need at least 2 to fit a "
                         "covariance (use larger images: NIQE works on 96x96 blocks)")
    return np.nanmean(feats, axis=0), np.cov(feats[valid], rowvar=False)


def niqe_from_features(features: np.ndarray, params: NIQEParams) -> float:
    """NIQE of one image from its block features: ``sqrt(d^T pinv((S_p + S) / 2) d)``, ``d = mu_p - mu``.

    Args:
      features: [n_blocks, 36] from :func:`niqe_features`; rows with NaN are dropped for the covariance.
      params: the pristine model (see :func:`load_niqe_params`).
    Returns:
      the score (float, >= 0; lower is better).
    """
    mu, cov = _gaussian_fit(np.asarray(features, np.float64), "NIQE")
    d = params.mu - mu
    avg = (params.cov + cov) / 2
    # MATLAB pinv's default tolerance: max(size) * eps * the largest singular value.
    inv = np.linalg.pinv(avg, rtol=max(avg.shape) * np.finfo(np.float64).eps)
    return float(np.sqrt(d @ inv @ d))


# ---------------------------------------------------------------------------------------------------------------
# Images in, scores out


def to_gray255(img: np.ndarray, color: str = "yiq") -> np.ndarray:
    """One image in [0, 1] -> the rounded grey image NIQE measures.

    Args:
      img: [H, W, 3] RGB, or [H, W, 1] / [H, W] grey, in [0, 1] (NumPy or JAX).
      color: ``"yiq"`` (0.299 R + 0.587 G + 0.114 B, pyiqa's default) or ``"ycbcr"`` (BT.601 studio-swing luma,
        basicsr's default); ignored for grey input.
    Returns:
      [H, W] float64 integers in [0, 255] (round half to even, as NumPy/PyTorch round in the references).
    """
    x = np.asarray(img, np.float64)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        y = x * 255.0
    elif x.ndim == 3 and x.shape[-1] == 3:
        if color == "yiq":
            y = x @ (255.0 * np.asarray(_YIQ_Y))
        elif color == "ycbcr":
            y = x @ np.asarray(BT601_Y_WEIGHTS) + BT601_Y_OFFSET
        else:
            raise ValueError(f"color must be 'yiq' or 'ycbcr', got {color!r}")
    else:
        raise ValueError(f"want one [H, W, 3], [H, W, 1] or [H, W] image, got shape {x.shape}")
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"want images in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
    return np.round(y)


def niqe(images: np.ndarray, params: NIQEParams, *, color: str = "yiq", crop_border: int = 0,
         block_size: int = BLOCK_SIZE) -> np.ndarray:
    """NIQE of each image (no reference needed; lower is better).

    Args:
      images: [N, H, W, 3] (or one [H, W, 3], or a list of [H, W, 3] of different sizes; also grey [..., 1]) in
        [0, 1], NHWC, NumPy or JAX; at least ``block_size`` + ``2 * crop_border`` pixels a side and two blocks
        with finite features.
      params: the pristine model from :func:`load_niqe_params` (or :func:`fit_niqe_params`).
      color: grey conversion, ``"yiq"`` (pyiqa) or ``"ycbcr"`` (basicsr); see the module docstring.
      crop_border: pixels dropped from each edge before measuring.
      block_size: block side (96 in the paper and in every published pristine model).
    Returns:
      [N] float64 scores (a 0-d array for one image, [len] for a list).
    """
    if isinstance(images, (list, tuple)):  # images of different sizes
        return np.asarray([niqe(im, params, color=color, crop_border=crop_border, block_size=block_size)
                           for im in images], np.float64)
    x = np.asarray(images)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"niqe: want [N, H, W, C] or [H, W, C] images, got shape {x.shape}")
    out = np.empty(x.shape[0], np.float64)
    for i, img in enumerate(x):
        gray = to_gray255(img, color)
        if crop_border:
            c = int(crop_border)
            gray = gray[c:-c, c:-c]
        feats, _ = niqe_features(gray, block_size)
        out[i] = niqe_from_features(feats, params)
    return out[0] if single else out


def fit_niqe_params(images: Iterable[np.ndarray], *, color: str = "yiq", block_size: int = BLOCK_SIZE,
                    sharpness_threshold: float = SHARPNESS_THRESHOLD) -> NIQEParams:
    """Fit a pristine model to a set of undistorted images, as the MATLAB release's ``estimatemodelparam``.

    Each image contributes the features of its sharp blocks: those whose mean local standard deviation exceeds
    ``sharpness_threshold`` times the image's sharpest block. The model is the mean and covariance of all of
    them (rows with NaN dropped).

    Args:
      images: [H, W, 3] (or grey) arrays in [0, 1], NumPy or JAX, sizes may differ.
      color, block_size: as in :func:`niqe` (use the same values when scoring).
      sharpness_threshold: 0.75 in the MATLAB release.
    Returns:
      :class:`NIQEParams` (save it with :func:`save_niqe_params`).
    """
    rows = []
    for img in images:
        feats, sharp = niqe_features(to_gray255(img, color), block_size)
        rows.append(feats[sharp > sharpness_threshold * sharp.max()])
    if not rows:
        raise ValueError("fit_niqe_params: no images")
    mu, cov = _gaussian_fit(np.concatenate(rows, axis=0), "fit_niqe_params")
    return NIQEParams(mu, cov)


# ---------------------------------------------------------------------------------------------------------------
# Parameter files

# (mean key, covariance key) of the published formats: basicsr's .npz and the MATLAB release's .mat (pyiqa's
# ``niqe_modelparameters.mat`` is the same file).
_KEYS = (("mu_pris_param", "cov_pris_param"), ("mu_prisparam", "cov_prisparam"))
_MISSING_HELP = ("NIQE needs the pristine model fitted by its authors: basicsr's `basicsr/metrics/"
                 "niqe_pris_params.npz` (keys mu_pris_param, cov_pris_param) or `modelparameters.mat` from the "
                 "NIQE MATLAB release (keys mu_prisparam, cov_prisparam); jsr does not bundle either. "
                 "fit_niqe_params() fits a model of your own.")


def load_niqe_params(path: str | os.PathLike) -> NIQEParams:
    """Read a pristine NIQE model.

    Args:
      path: ``.npz`` (basicsr's ``niqe_pris_params.npz`` or :func:`save_niqe_params`' output) or ``.mat`` (the
        MATLAB release's ``modelparameters.mat``, read with ``scipy.io.loadmat``). Either key set is accepted in
        either format.
    Returns:
      :class:`NIQEParams` with ``mu`` [36] and ``cov`` [36, 36] float64.
    Raises:
      FileNotFoundError (with where to get the file) if ``path`` does not exist; ValueError naming the problem
      if the file cannot be read, lacks the keys, or holds wrongly shaped, non-finite or asymmetric arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIQE pristine parameters not found at {path}. {_MISSING_HELP}")
    try:
        if path.suffix.lower() == ".mat":
            from scipy import io as sio

            data = {k: v for k, v in sio.loadmat(path).items() if not k.startswith("__")}
        elif path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        else:
            raise ValueError(f"unknown extension {path.suffix!r} (want .npz or .mat)")
    except Exception as e:  # a corrupt zip, a MATLAB v7.3 (HDF5) file, a pickle...: one clear error for all
        raise ValueError(f"{path}: cannot read NIQE parameters: {type(e).__name__}: {e}") from None
    for mu_key, cov_key in _KEYS:
        if mu_key in data and cov_key in data:
            break
    else:
        raise ValueError(f"{path}: no NIQE parameters (want keys {_KEYS[0]} or {_KEYS[1]}, found "
                         f"{sorted(data)}). {_MISSING_HELP}")
    mu = np.asarray(data[mu_key], np.float64)
    cov = np.asarray(data[cov_key], np.float64)
    if mu.size != N_FEATURES or cov.shape != (N_FEATURES, N_FEATURES):
        raise ValueError(f"{path}: {mu_key} has shape {mu.shape} and {cov_key} {cov.shape}; NIQE wants "
                         f"{N_FEATURES} means and a {N_FEATURES}x{N_FEATURES} covariance")
    mu = mu.reshape(N_FEATURES)
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError(f"{path}: NIQE parameters contain NaN or infinity")
    if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-9 * np.abs(cov).max()):
        raise ValueError(f"{path}: {cov_key} is not symmetric, so it is not a covariance")
    return NIQEParams(mu, cov)


def save_niqe_params(path: str | os.PathLike, params: NIQEParams) -> None:
    """Write a pristine model as ``.npz`` with basicsr's keys (``mu_pris_param``, ``cov_pris_param``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to other suffixes
        np.savez(f, mu_pris_param=np.asarray(params.mu, np.float64), cov_pris_param=np.asarray(params.cov,
                                                                                               np.float64))
