"""Fréchet Inception Distance (Heusel et al. 2017) between two image sets, as pytorch-fid computes it.

``FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))`` over the 2048-d pool features of the FID
Inception-v3 (:mod:`jsr.metrics.inception`). Statistics are float64 (``np.cov``, ``ddof=1``); the matrix square
root is ``scipy.linalg.sqrtm``; if it is not finite (a singular product) ``eps`` is added to both diagonals and it
is taken again; an imaginary part that is numerical noise (diagonal below 1e-3) is dropped, a larger one is an
error. Lower is better; 0 for identical statistics.

Folders: every file whose extension is one of pytorch-fid's (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp;
matched case-insensitively here), sorted by name, read by :func:`jsr.data.images.read_image` as everywhere in jsr
(the same 8-bit values as pytorch-fid's Pillow ``convert("RGB")``; unlike it, EXIF orientation is applied and
16-bit files keep their depth). Each image is resized
to 299x299 on its own, so sizes may differ (a new size costs a small compile of the resize only). Small sets give
biased FID (the SR papers use a few hundred images per set); with fewer images than feature dimensions the
covariances are singular and the value is unstable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from jsr.data import images as image_io  # same layer; jsr.data imports nothing from jsr.metrics
from jsr.metrics.inception import inception_features, resize_bilinear


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive, as pytorch-fid), sorted by name
    (:func:`jsr.data.images.list_images`)."""
    return image_io.list_images(folder, recursive=False)


@jax.jit
def _resize_one(img: jax.Array) -> jax.Array:
    # One image to 299x299 on the device. Compiles per input size, but only two small matmuls: the Inception
    # trunk itself then always sees [batch, 299, 299, 3] and compiles once, whatever the folder's sizes.
    return resize_bilinear(img[None])[0]


def image_activations(images: Iterable[np.ndarray], params: Mapping, *, batch_size: int = 50,
                      dims: int = 2048) -> np.ndarray:
    """FID features of a stream of images.

    Args:
      images: [H, W, 3] arrays in [0, 1], any sizes (each is resized to 299x299 on its own, as pytorch-fid does).
      params: :class:`jsr.metrics.inception.FIDInceptionV3` parameters.
      batch_size: images per network call; the last batch is padded so that the network compiles once.
      dims: feature width (2048 for standard FID; 64, 192, 768 as pytorch-fid's ``--dims``).
    Returns:
      [N, dims] float32 (N = number of images, in order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    batch: list[jax.Array] = []

    def flush() -> None:
        n = len(batch)
        x = jnp.stack(batch + [jnp.zeros_like(batch[0])] * (batch_size - n))
        out.append(np.asarray(inception_features(params, x, dims=dims, resize=False))[:n])
        batch.clear()

    for img in images:
        img = np.asarray(img, np.float32)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"image_activations: want [H, W, 3] images, got shape {img.shape}")
        batch.append(_resize_one(jnp.asarray(img)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not out:
        raise ValueError("image_activations: no images")
    return np.concatenate(out, axis=0)


def folder_activations(folder: str | os.PathLike, params: Mapping, *, batch_size: int = 50,
                       dims: int = 2048) -> np.ndarray:
    """FID features of every image in ``folder`` (see :func:`list_images`): [N, dims] float32."""
    files = list_images(folder)
    if not files:
        raise ValueError(f"{folder}: no images (looked for {', '.join(image_io.IMAGE_EXTENSIONS)})")
    return image_activations(_load_all(files), params, batch_size=batch_size, dims=dims)


def _load_all(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:
        yield image_io.read_image(f)


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, ``ddof=1``) of features [N, D], N >= 2."""
    acts = np.asarray(acts, np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"want features [N, D] with N >= 2, got shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu``/``sigma`` as ``.npz`` with pytorch-fid's keys, reusable as one side of :func:`fid_from_folders`."""
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu``, ``sigma`` from a pytorch-fid ``.npz`` statistics file (keys ``mu``, ``sigma``), float64."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: not FID statistics (want keys 'mu' and 'sigma', found {f.files})")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def folder_statistics(path: str | os.PathLike, params: Mapping, *, batch_size: int = 50,
                      dims: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a folder of images, or read from a ``.npz`` statistics file."""
    if str(path).endswith(".npz"):
        return load_statistics(path)
    return activation_statistics(folder_activations(path, params, batch_size=batch_size, dims=dims))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): ``|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))``.

    Args:
      mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances. Computed in float64.
      eps: diagonal offset used only when ``sqrtm(s1 s2)`` is not finite.
    Returns:
      the distance (float).
    Raises:
      ValueError on mismatched shapes or a square root whose imaginary part is not numerical noise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm(s1 s2) has an imaginary part of "
                             f"{np.abs(covmean.imag).max():.3g} (covariances not positive semi-definite?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_folders(dir_a: str | os.PathLike, dir_b: str | os.PathLike, params: Mapping,
                     batch_size: int = 50, *, dims: int = 2048) -> float:
    """FID between two folders of images (either may instead be a ``.npz`` statistics file).

    Args:
      dir_a, dir_b: folders (see :func:`list_images`) or pytorch-fid ``.npz`` statistics.
      params: :class:`jsr.metrics.inception.FIDInceptionV3` parameters (``load_inception_params(
        "pt_inception-2015-12-05-6726825d.pth")``).
      batch_size: images per device call.
      dims: feature width (2048 for the standard FID).
    Returns:
      FID (float; lower is better).
    """
    mu1, s1 = folder_statistics(dir_a, params, batch_size=batch_size, dims=dims)
    mu2, s2 = folder_statistics(dir_b, params, batch_size=batch_size, dims=dims)
    return frechet_distance(mu1, s1, mu2, s2)
