"""Blur kernels of the Real-ESRGAN degradation, in closed form.

Every kernel is a square ``float32`` array of odd side ``size``, centred on ``size // 2``, normalised to sum 1.
Offsets are integer pixel positions ``x`` (column) and ``y`` (row) from the centre. With the covariance
``S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T`` and ``q(x) = x^T S^-1 x``:

    gaussian              k(x) ~ exp(-q / 2)
    generalized gaussian  k(x) ~ exp(-q^beta / 2)
    plateau               k(x) ~ 1 / (1 + q^beta)
    sinc (circular low-pass, cut-off omega_c)
                          k(r) ~ omega_c J1(omega_c r) / (2 pi r),   k(0) ~ omega_c^2 / (4 pi)

The ``iso`` variants use ``sigma_x = sigma_y`` and no rotation. ``random_kernel`` draws one kernel the way the
Real-ESRGAN pipeline does (family, size, parameters) from a ``np.random.Generator`` and pads it to the fixed size.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

KERNEL_TYPES = ("iso", "aniso", "gen_iso", "gen_aniso", "plateau_iso", "plateau_aniso")


def _offsets(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    x, y = np.meshgrid(ax, ax)  # x varies along columns, y along rows
    return x, y


def covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """The 2x2 covariance ``R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T`` (float64)."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got sigma_x={sigma_x}, sigma_y={sigma_y}")
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    x, y = _offsets(size)
    inv = np.linalg.inv(covariance(sigma_x, sigma_y, theta))
    return inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y


def _normalise(k: np.ndarray) -> np.ndarray:
    return (k / k.sum()).astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Anisotropic Gaussian ``exp(-q/2)``; isotropic when ``sigma_y`` is None (or equal) and ``theta`` is 0."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                                beta: float = 1.0) -> np.ndarray:
    """Generalized Gaussian ``exp(-q^beta / 2)``; ``beta = 1`` is the Gaussian, large beta a flat disc."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if beta <= 0:
        raise ValueError(f"generalized Gaussian beta must be positive, got {beta}")
    return _normalise(np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                   beta: float = 1.0) -> np.ndarray:
    """Plateau ``1 / (1 + q^beta)``: flat top, heavy tails."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if beta <= 0:
        raise ValueError(f"plateau beta must be positive, got {beta}")
    return _normalise(1.0 / (1.0 + np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta)))


def bessel_j1(x: np.ndarray | float, points: int = 128) -> np.ndarray:
    """Bessel function of the first kind, order 1, from Bessel's integral.

    ``J1(x) = 1/(2 pi) * integral_0^{2 pi} cos(t - x sin t) dt``. The integrand is periodic and analytic, so the
    trapezoid rule converges geometrically once ``points`` exceeds ``|x|``: 128 points give ~1e-15 absolute error
    for ``|x| <= 60`` (kernels need ``|x| <= pi * 10 * sqrt(2) ~ 44``). Written here so the core package needs no scipy.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.arange(points, dtype=np.float64) * (2.0 * math.pi / points)
    return np.cos(t - x[..., None] * np.sin(t)).mean(axis=-1)


def sinc_kernel(size: int, omega_c: float, pad_to: int = 0) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel ``omega_c J1(omega_c r) / (2 pi r)`` with cut-off ``omega_c`` (radians
    per pixel, in ``(0, pi]``), normalised to sum 1 and zero-padded to ``pad_to`` if larger than ``size``."""
    if not 0 < omega_c <= math.pi + 1e-9:
        raise ValueError(f"sinc cut-off must be in (0, pi], got {omega_c}")
    x, y = _offsets(size)
    r = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * bessel_j1(omega_c * r) / (2.0 * math.pi * r)
    k[size // 2, size // 2] = omega_c ** 2 / (4.0 * math.pi)
    k = _normalise(k)
    return pad_kernel(k, pad_to) if pad_to > size else k


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a centred odd kernel to ``size x size`` (blurring with it is unchanged)."""
    k = kernel.shape[0]
    if size < k or (size - k) % 2:
        raise ValueError(f"cannot pad a {k}x{k} kernel to {size}x{size}: sizes must both be odd, target larger")
    p = (size - k) // 2
    return np.pad(kernel, ((p, p), (p, p)))


def _split_beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Shape parameter for a range ``[lo, hi]``. When the range straddles 1, below or above 1 with equal
    probability (as Real-ESRGAN samples): half of the draws make the kernel peakier than a Gaussian, half flatter,
    however lopsided the range ([0.5, 4] would otherwise give beta < 1 only 14 % of the time). Otherwise uniform
    (Real-ESRGAN would return exactly 1 for half the draws of a [1, 2] range; we do not reproduce that)."""
    if lo < 1.0 < hi:
        return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi))
    return float(rng.uniform(lo, hi))


def random_kernel(rng: np.random.Generator, *, sizes: Sequence[int], types: Sequence[str],
                  probs: Sequence[float], sinc_prob: float, sigma: Sequence[float],
                  rotation: Sequence[float], beta_gaussian: Sequence[float], beta_plateau: Sequence[float],
                  pad_to: int = 21) -> tuple[np.ndarray, dict]:
    """Draw one blur kernel: a random odd size from ``sizes``; with ``sinc_prob`` a sinc kernel (cut-off
    ``U[pi/3, pi]`` for sizes below 13, else ``U[pi/5, pi]``, so small kernels never get a cut-off their support
    cannot represent), otherwise a family from ``types`` with ``probs``. Sigmas ``U[sigma]`` (independently per
    axis for the aniso families), rotation ``U[rotation]``. Returns the kernel padded to ``pad_to`` and a dict
    describing the draw (for tests and logging)."""
    size = int(sizes[int(rng.integers(len(sizes)))])
    if size > pad_to:
        raise ValueError(f"kernel size {size} exceeds the padded size {pad_to}")
    if rng.random() < sinc_prob:
        omega = float(rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi))
        return sinc_kernel(size, omega, pad_to), {"type": "sinc", "size": size, "omega_c": omega}
    p = np.asarray(probs, dtype=np.float64)
    kind = types[int(rng.choice(len(types), p=p / p.sum()))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sx = sy = float(rng.uniform(*sigma))
        theta = 0.0
    else:
        sx, sy = float(rng.uniform(*sigma)), float(rng.uniform(*sigma))
        theta = float(rng.uniform(*rotation))
    info = {"type": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}
    if kind.startswith("gen"):
        info["beta"] = beta = _split_beta(rng, *beta_gaussian)
        k = generalized_gaussian_kernel(size, sx, sy, theta, beta)
    elif kind.startswith("plateau"):
        info["beta"] = beta = _split_beta(rng, *beta_plateau)
        k = plateau_kernel(size, sx, sy, theta, beta)
    else:
        k = gaussian_kernel(size, sx, sy, theta)
    return pad_kernel(k, pad_to), info
