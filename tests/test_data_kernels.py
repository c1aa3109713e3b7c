"""Blur kernels against their closed forms (jsr.data.kernels)."""

import math

import numpy as np
import pytest

from jsr.data import kernels as K

# Kernels are float32: sums and closed-form comparisons hold to float32 rounding of values <= 1.
ATOL = 2e-7


def _closed_form(size, f):
    """Evaluate f(x, y) (x: column offset, y: row offset) on the grid, normalise: an independent reference."""
    r = size // 2
    k = np.array([[f(x, y) for x in range(-r, r + 1)] for y in range(-r, r + 1)], dtype=np.float64)
    return k / k.sum()


def _q(sx, sy, theta):
    c, s = math.cos(theta), math.sin(theta)

    def q(x, y):  # rotate the offset into the kernel's principal axes
        u, v = c * x + s * y, -s * x + c * y
        return u * u / sx ** 2 + v * v / sy ** 2
    return q


@pytest.mark.parametrize("size,sx,sy,theta", [(21, 2.0, 2.0, 0.0), (13, 0.7, 2.5, 0.6), (7, 3.0, 0.2, -2.1)])
def test_gaussian_matches_closed_form(size, sx, sy, theta):
    q = _q(sx, sy, theta)
    ref = _closed_form(size, lambda x, y: math.exp(-0.5 * q(x, y)))
    np.testing.assert_allclose(K.gaussian_kernel(size, sx, sy, theta), ref, atol=ATOL)


@pytest.mark.parametrize("beta", [0.5, 1.7, 4.0])
def test_generalized_gaussian_matches_closed_form(beta):
    q = _q(1.5, 2.5, 0.9)
    ref = _closed_form(15, lambda x, y: math.exp(-0.5 * q(x, y) ** beta))
    np.testing.assert_allclose(K.generalized_gaussian_kernel(15, 1.5, 2.5, 0.9, beta), ref, atol=ATOL)


@pytest.mark.parametrize("beta", [1.0, 1.4, 2.0])
def test_plateau_matches_closed_form(beta):
    q = _q(2.0, 1.0, -0.4)
    ref = _closed_form(17, lambda x, y: 1.0 / (1.0 + q(x, y) ** beta))
    np.testing.assert_allclose(K.plateau_kernel(17, 2.0, 1.0, -0.4, beta), ref, atol=ATOL)


def test_generalized_gaussian_with_beta_one_is_the_gaussian():
    np.testing.assert_allclose(K.generalized_gaussian_kernel(21, 1.2, 2.4, 0.3, 1.0),
                               K.gaussian_kernel(21, 1.2, 2.4, 0.3), atol=ATOL)


@pytest.mark.parametrize("make", [
    lambda: K.gaussian_kernel(21, 2.3),
    lambda: K.generalized_gaussian_kernel(21, 1.7, beta=0.6),
    lambda: K.plateau_kernel(21, 1.1, beta=1.8),
    lambda: K.sinc_kernel(21, 1.3),
])
def test_isotropic_kernels_are_normalised_and_isotropic(make):
    k = make()
    assert k.dtype == np.float32 and k.shape == (21, 21)
    assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5
    # Symmetric under the dihedral group of the square...
    for t in (np.rot90(k), k.T, k[::-1], k[:, ::-1]):
        np.testing.assert_allclose(t, k, atol=ATOL)
    # ...and a function of the radius alone: equal radii (3,4) and (5,0) hold equal values.
    c = 10
    np.testing.assert_allclose(k[c + 3, c + 4], k[c + 5, c], atol=ATOL)
    np.testing.assert_allclose(k[c + 0, c + 5], k[c - 4, c + 3], atol=ATOL)


def test_anisotropic_kernel_second_moments_are_the_covariance():
    # A narrow Gaussian (sigma <= 2) inside 21x21 loses < 1e-6 of its mass, so its second moments are Sigma.
    sx, sy, theta = 1.2, 2.0, 0.7
    k = K.gaussian_kernel(21, sx, sy, theta).astype(np.float64)
    ax = np.arange(21) - 10
    x, y = np.meshgrid(ax, ax)
    moments = np.array([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    np.testing.assert_allclose(moments, K.covariance(sx, sy, theta), atol=2e-3)
    assert not np.allclose(k, k.T, atol=1e-4)  # truly anisotropic


def test_rotating_by_a_quarter_turn_rotates_the_kernel():
    k0 = K.gaussian_kernel(15, 0.8, 2.6, 0.0)
    k90 = K.gaussian_kernel(15, 0.8, 2.6, math.pi / 2)
    np.testing.assert_allclose(k90, k0.T, atol=ATOL)
    np.testing.assert_allclose(K.plateau_kernel(15, 0.8, 2.6, math.pi, 1.5), K.plateau_kernel(15, 0.8, 2.6, 0.0, 1.5),
                               atol=ATOL)


def test_bessel_j1_matches_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.linspace(0.0, 50.0, 2001)
    np.testing.assert_allclose(K.bessel_j1(x), special.j1(x), atol=1e-13)


def test_sinc_kernel_matches_closed_form():
    special = pytest.importorskip("scipy.special")
    omega = 2.1

    def f(x, y):
        r = math.hypot(x, y)
        return omega ** 2 / (4 * math.pi) if r == 0 else omega * special.j1(omega * r) / (2 * math.pi * r)
    np.testing.assert_allclose(K.sinc_kernel(13, omega), _closed_form(13, f), atol=ATOL)


@pytest.mark.parametrize("omega", [math.pi / 4, math.pi / 2, 0.8 * math.pi])
def test_sinc_kernel_cuts_off_at_omega(omega):
    """Frequency response (zero-padded DFT): ~1 well inside |w| < omega, ~0 well outside. Truncating the jinc
    to 21 taps (and renormalising to DC gain 1) ripples the pass band by up to ~15 % and leaks up to ~12 % into
    the stop band, with a transition band of ~2 pi / 21 around the cut-off; the bounds leave that room and no
    more (an ideal low-pass at a different cut-off, or a Gaussian, fails them)."""
    k = K.sinc_kernel(21, omega).astype(np.float64)
    n = 256
    pad = np.zeros((n, n))
    pad[:21, :21] = k
    pad = np.roll(pad, (-10, -10), axis=(0, 1))  # centre at the origin: a real, even response
    response = np.fft.fft2(pad).real
    w = 2 * math.pi * np.fft.fftfreq(n)
    radius = np.hypot(*np.meshgrid(w, w))
    band = 2 * math.pi / 21
    inside, outside = radius < omega - band, (radius > omega + band) & (radius < math.pi)
    assert inside.any() and outside.any()
    assert abs(response[inside].mean() - 1.0) < 0.07
    assert 0.8 < response[inside].min() and response[inside].max() < 1.2
    assert np.abs(response[outside]).mean() < 0.05 and np.abs(response[outside]).max() < 0.15


def test_pad_kernel_keeps_values_centred():
    k = K.gaussian_kernel(7, 1.0)
    p = K.pad_kernel(k, 21)
    assert p.shape == (21, 21) and p.sum() == pytest.approx(k.sum())
    np.testing.assert_array_equal(p[7:14, 7:14], k)
    with pytest.raises(ValueError):
        K.pad_kernel(k, 8)


def _random(rng, **over):
    args = dict(sizes=(7, 9, 11, 13, 15, 17, 19, 21), types=K.KERNEL_TYPES, probs=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                sinc_prob=0.0, sigma=(0.2, 3.0), rotation=(-math.pi, math.pi), beta_gaussian=(0.5, 4.0),
                beta_plateau=(1.0, 2.0), pad_to=21)
    args.update(over)
    return K.random_kernel(rng, **args)


@pytest.mark.parametrize("family", K.KERNEL_TYPES)
def test_random_kernel_draws_the_forced_family(family):
    rng = np.random.default_rng(0)
    probs = tuple(1.0 if t == family else 0.0 for t in K.KERNEL_TYPES)
    for _ in range(5):
        k, info = _random(rng, probs=probs)
        assert info["type"] == family and k.shape == (21, 21) and info["size"] % 2 == 1
        assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5 and (k >= 0).all()
        pad = (21 - info["size"]) // 2
        if pad:
            assert not k[:pad].any() and not k[:, -pad:].any()  # padded with zeros outside the drawn size
        if "aniso" not in family:
            assert info["sigma_x"] == info["sigma_y"] and info["theta"] == 0.0
        if family.startswith("gen"):
            assert 0.5 <= info["beta"] <= 4.0
        if family.startswith("plateau"):
            assert 1.0 <= info["beta"] <= 2.0


def test_random_sinc_cutoff_depends_on_size():
    rng = np.random.default_rng(1)
    small, large = [], []
    for _ in range(300):
        _, info = _random(rng, sinc_prob=1.0)
        assert info["type"] == "sinc"
        (small if info["size"] < 13 else large).append(info["omega_c"])
    assert min(small) >= math.pi / 3 and max(small) <= math.pi
    assert min(large) >= math.pi / 5 and min(large) < math.pi / 3  # the wider range is actually used


def test_generalized_beta_split_around_one():
    rng = np.random.default_rng(2)
    betas = [_random(rng, probs=(0, 0, 1, 0, 0, 0))[1]["beta"] for _ in range(400)]
    below = np.mean(np.array(betas) < 1.0)
    assert 0.4 < below < 0.6  # half below 1 although [0.5, 1) is a seventh of [0.5, 4]


def test_random_kernel_is_a_function_of_the_generator_state():
    a = _random(np.random.default_rng(5), sinc_prob=0.3)
    b = _random(np.random.default_rng(5), sinc_prob=0.3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
