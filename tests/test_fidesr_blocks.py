"""FiDeSR's building blocks: LRRB (+ converter), DAW maps and weight, LFIM, the LPIPS spatial map.

References are written here independently of the code under test: a PyTorch twin of the release's LRRB, NumPy /
scipy.ndimage versions of the DAW and LFIM formulas (``scipy.ndimage.correlate(mode="nearest")`` is PyTorch's
replicate padding; ``np.quantile`` linear is ``torch.quantile``), and the ``lpips`` package itself.

Tolerances (float32 on CPU; the references run in float64 unless stated):
* LRRB vs PyTorch f32: relative L2 error < 1e-5 on the LRRB's own output (17 convs; measured 2e-7). The
  zero-init identity and the converter round trip are exact.
* DAW maps and weight vs NumPy f64: max abs error < 2e-5 on maps in [0, 1] (measured 3e-7). Margin because the
  percentile normalisation divides by ``q95 - q05`` and so amplifies f32 rounding of the filters.
* LFIM vs NumPy f64 FFT: max abs error < 1e-5 on O(1) latents (measured 3e-7, f32 FFT rounding).
* Sinusoid test: analytic Butterworth factors of the exact bins, < 1e-5 (f32 FFT rounding only).
* LPIPS spatial map vs the ``lpips`` package (f32): relative L2 error < 1e-4, as every jsr LPIPS parity test.
* Bilinear resize vs ``F.interpolate``: < 1e-6 absolute (same two-tap arithmetic).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jsr.models.lrrb import (LRRBConfig, init_lrrb_params, lrrb_config_from_state, lrrb_from_torch,
                             lrrb_refine, lrrb_to_torch)
from jsr.sr import daw, lfim
from jsr.weights.convert import CheckpointMismatchError
from tests.helpers import rel_error

# ----------------------------------------------------------------------------------------------------------- LRRB


# One compiled refine per (shape, config) for the whole module (init, parity).
_refine = jax.jit(lrrb_refine, static_argnames="config")


def test_lrrb_init_is_identity():
    params = init_lrrb_params(jax.random.key(0))  # LRRB.init under jit (the overridden init path)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 16, 12, 4)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((2, 16, 12, 4)), jnp.float32)
    out = _refine(params, z, eps, config=LRRBConfig())
    assert out.shape == eps.shape and out.dtype == eps.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(eps))  # zero-initialised out_conv: exactly eps
    # Exactly the release's zero-initialised layers are zero.
    p = jax.tree_util.tree_map(np.asarray, params)
    for blk in ("db1", "db2", "db3"):
        assert not p[blk]["conv5"]["kernel"].any() and not p[blk]["conv5"]["bias"].any()
        assert p[blk]["conv1"]["kernel"].any()
    assert not p["out_conv"]["kernel"].any() and not p["out_conv"]["bias"].any() and p["in_conv"]["kernel"].any()


def _torch_lrrb(cfg: LRRBConfig):
    """The release's LRRB architecture rebuilt in plain torch (names are the release's state-dict keys)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Dense(nn.Module):
        def __init__(self, c, g):
            super().__init__()
            for k in range(1, 5):
                setattr(self, f"conv{k}", nn.Conv2d(c + (k - 1) * g, g, 3, 1, 1))
            self.conv5 = nn.Conv2d(c + 4 * g, c, 3, 1, 1)

        def forward(self, x):
            feats = [x]
            for k in range(1, 5):
                feats.append(torch.nn.functional.silu(getattr(self, f"conv{k}")(torch.cat(feats, 1))))
            return self.conv5(torch.cat(feats, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_conv = nn.Conv2d(cfg.in_channels, cfg.mid_channels, 1)
            self.db1, self.db2, self.db3 = (Dense(cfg.mid_channels, cfg.growth) for _ in range(3))
            self.out_conv = nn.Conv2d(cfg.mid_channels, cfg.in_channels // 2, 1)

        def forward(self, x):
            f = self.in_conv(x)
            for db in (self.db1, self.db2, self.db3):
                f = f + db(f) * cfg.res_scale
            return self.out_conv(f)

    return Net()


def test_lrrb_matches_torch_twin(monkeypatch):
    from jsr.models import layers

    cfg = LRRBConfig()
    torch = pytest.importorskip("torch")
    from tests.helpers import randomise_torch

    net = randomise_torch(_torch_lrrb(cfg), seed=3).eval()  # every tensor random, incl. the zero-init ones
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    assert lrrb_config_from_state(state) == cfg
    params = lrrb_from_torch(net.state_dict())  # sizes inferred from the shapes
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 16, 12, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 16, 12, 4)).astype(np.float32)
    with torch.no_grad():
        tcat = torch.from_numpy(np.concatenate([z, eps], -1)).permute(0, 3, 1, 2)
        ref = (torch.from_numpy(eps).permute(0, 3, 1, 2) + net(tcat)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(_refine(params, z, eps, config=cfg))
    assert rel_error(got - eps, ref - eps) < 1e-5  # on the LRRB's own output, not diluted by eps
    with monkeypatch.context() as m:  # the im2col conv path too (small maps with many channels, YNN fusions on)
        m.setattr(layers, "im2col_pays", lambda pixels, channels: True)
        fresh = jax.jit(lrrb_refine, static_argnames="config")  # traced anew, not the module's cached program
        assert rel_error(np.asarray(fresh(params, z, eps, config=cfg)) - eps, ref - eps) < 1e-5
    # 24x24 = 576 px: a bigger map.
    z2, e2 = (rng.standard_normal((1, 24, 24, 4)).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        ref2 = net(torch.from_numpy(np.concatenate([z2, e2], -1)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert rel_error(_refine(params, z2, e2, config=cfg) - e2, ref2) < 1e-5


def test_lrrb_converter_round_trip_and_errors():
    torch = pytest.importorskip("torch")
    from tests.helpers import randomise_torch

    net = randomise_torch(_torch_lrrb(LRRBConfig()), seed=4)
    sd = net.state_dict()
    params = lrrb_from_torch({"lrrb_state_dict": sd, "lora_rank_unet": 8})  # a whole release checkpoint works
    back = lrrb_to_torch(params)
    assert set(back) == set(sd) and len(back) == 34
    for k, v in sd.items():
        assert back[k].shape == tuple(v.shape)
        np.testing.assert_array_equal(back[k], v.numpy())
    again = lrrb_from_torch(back)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()})  # loads into the torch twin
    bad = dict(back)
    del bad["db2.conv3.bias"]
    with pytest.raises(CheckpointMismatchError, match="db2.conv3.bias"):
        lrrb_from_torch(bad, LRRBConfig())
    small = {k: v.detach().numpy() for k, v in _torch_lrrb(LRRBConfig(mid_channels=32, growth=16)).state_dict().items()}
    assert lrrb_config_from_state(small, 0.5) == LRRBConfig(mid_channels=32, growth=16, res_scale=0.5)
    assert lrrb_from_torch(small)["db3"]["conv5"]["kernel"].shape == (3, 3, 32 + 4 * 16, 32)
    cfg = LRRBConfig(mid_channels=48, res_scale=0.1)
    assert LRRBConfig.from_json(cfg.to_json()) == cfg and json.loads(cfg.to_json())["mid_channels"] == 48
    with pytest.raises(ValueError, match="unknown"):
        LRRBConfig.from_dict({"mid_chanels": 3})


# ------------------------------------------------------------------------------------------- NumPy references

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
LAP = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)


def _corr(img2d: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ndimage.correlate(img2d, k, mode="nearest")  # nearest = PyTorch's replicate padding


def _box(img2d):
    return _corr(img2d, np.full((3, 3), 1 / 9))


def _pnorm(x: np.ndarray) -> np.ndarray:
    q05, q95 = np.quantile(x.reshape(-1), [0.05, 0.95])
    return np.clip((x - q05) / (q95 - q05 + 1e-6), 0, 1)


def _np_detail(img: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] -> [B, H, W]."""
    out = []
    for im in img.astype(np.float64):
        g = im @ np.array([0.299, 0.587, 0.114])
        sob = np.hypot(_corr(g, SOBEL_X), _corr(g, SOBEL_X.T))
        lap = np.abs(_corr(g, LAP))
        var = _box((g - _box(g)) ** 2)
        out.append(_box(_pnorm((sob + lap + var) / 3)))
    return np.stack(out)


def _np_error(x_sr, x_hq, lp, p=0.5):
    d = np.abs(x_sr.astype(np.float64) - x_hq)
    e = (1 - p) * (0.8 * d.mean(-1) + 0.2 * d.std(-1, ddof=1)) + p * lp
    return np.stack([_pnorm(x) for x in e])


def _np_softclip(w, wmax=2.0):
    out = []
    for x in w:
        b = _box(x)
        out.append(np.tanh(b / (b.mean() + 1e-6) / wmax) * wmax)
    return np.stack(out)


def _release_alpha(step, warmup=2000, ramp=1000, alpha=0.6):
    if step < warmup:
        return None
    return min(step - warmup, ramp) / ramp * alpha


def _np_weight(x_sr, x_hq, lp, step):
    a = _release_alpha(step)
    if a is None:
        return np.ones(x_hq.shape[:3])
    w = 1 + a * _np_softclip(_np_detail(x_hq) * _np_error(x_sr, x_hq, lp))
    return w / (w.mean(axis=(1, 2), keepdims=True) + 1e-8)


def _pair(seed, n=2, h=40, w=48):
    """An HQ image in [-1, 1] with edges, texture and flat areas, and an SR guess with structured errors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * (yy > 0.4) + 0.3 * np.cos(9 * yy) for c in range(3)], -1)
    hq = np.clip(base[None] * 0.7 + 0.25 * rng.standard_normal((n, h, w, 3)) * (xx[None, ..., None] > 0.5), -1, 1)
    sr = np.clip(hq + 0.2 * rng.standard_normal(hq.shape) * (yy[None, ..., None] < 0.7), -1, 1)
    lp = np.abs(rng.standard_normal((n, h, w))) * 0.3
    return sr.astype(np.float32), hq.astype(np.float32), lp.astype(np.float32)


# ------------------------------------------------------------------------------------------------------------- DAW


def test_detail_and_error_maps_match_numpy():
    sr, hq, lp = _pair(0)
    detail = jax.jit(daw.detail_map)
    d = np.asarray(detail(jnp.asarray(hq)))
    assert d.shape == hq.shape[:3] + (1,)
    np.testing.assert_allclose(d[..., 0], _np_detail(hq), atol=2e-5)
    assert d.min() >= 0 and d.max() <= 1 and d.max() > 0.9  # normalised, non-trivial
    for lp_in in (lp, lp[..., None]):  # [B, H, W] or [B, H, W, 1]
        e = np.asarray(jax.jit(daw.error_map)(jnp.asarray(sr), jnp.asarray(hq), jnp.asarray(lp_in), 0.5))
        np.testing.assert_allclose(e[..., 0], _np_error(sr, hq, lp), atol=2e-5)
    # Range matters (see daw's docstring): the [0, 1] image gives a different map than the [-1, 1] one.
    d01 = np.asarray(detail(jnp.asarray(hq * 0.5 + 0.5)))
    np.testing.assert_allclose(d01[..., 0], _np_detail(hq * 0.5 + 0.5), atol=2e-5)
    assert np.abs(d01 - d).max() > 1e-3


def test_ramp_matches_release_and_traces():
    steps = [0, 1999, 2000, 2001, 2500, 2999, 3000, 10_000]
    for s in steps:
        ref = _release_alpha(s) or 0.0
        assert abs(0.6 * float(daw.daw_ramp(s)) - ref) < 1e-7, s
    traced = jax.jit(lambda s: daw.daw_ramp(s))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(0.6 * np.asarray(traced), [_release_alpha(s) or 0.0 for s in steps], atol=1e-7)
    assert float(daw.daw_ramp(5, warmup=5, ramp=0)) == 1.0 and float(daw.daw_ramp(4, warmup=5, ramp=0)) == 0.0


def test_weight_matches_numpy_and_stops_gradient():
    sr, hq, lp = _pair(1)
    fn = jax.jit(lambda a, b, c, s: daw.daw_weight(a, b, c, s))  # the step is traced
    for step in (0, 2000, 2500, 4000):
        w = np.asarray(fn(sr, hq, lp, jnp.int32(step)))
        assert w.shape == hq.shape[:3] + (1,)
        np.testing.assert_allclose(w[..., 0], _np_weight(sr, hq, lp, step), atol=2e-5)
        np.testing.assert_allclose(w.mean(axis=(1, 2, 3)), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fn(sr, hq, lp, jnp.int32(1999))), 1.0)  # before warm-up: exactly 1
    w_full = np.asarray(fn(sr, hq, lp, jnp.int32(4000)))
    assert w_full.max() > 1.3 and w_full.min() < 0.8  # the weight really moves at full strength

    # No gradient flows through w (the release builds D and E under torch.no_grad()).
    g = jax.jit(jax.grad(lambda a: jnp.sum(daw.daw_weight(a, hq, lp, 4000) * 3.0)))(jnp.asarray(sr))
    assert not np.asarray(g).any()


def test_weight_lf_term_matches_numpy():
    sr, hq, lp = _pair(2, n=1)
    opts = daw.DAWOptions(alpha_lf=0.4, warmup=0, ramp=0)
    w = np.asarray(jax.jit(lambda *a: daw.daw_weight(*a, opts))(sr, hq, lp, 7))[..., 0]
    d, e = _np_detail(hq), _np_error(sr, hq, lp)
    d1 = np.stack([_box(x) for x in d])
    ref = 1 + 0.6 * _np_softclip(d * e) + 0.4 * _np_softclip(np.clip(1 - d1, 0, 1) * e)
    np.testing.assert_allclose(w, ref / (ref.mean(axis=(1, 2), keepdims=True) + 1e-8), atol=2e-5)


def test_resize_to_latent_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    w = rng.random((2, 64, 48, 1)).astype(np.float32)
    got = np.asarray(daw.resize_to_latent(jnp.asarray(w), (8, 6)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(w).permute(0, 3, 1, 2), size=(8, 6), mode="bilinear",
                                          align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # No anti-aliasing: an 8x reduction is the mean of the two centre pixels of each span (rows 3, 4; cols 3, 4).
    c = w[:, 3::8][:, :, :, :] + w[:, 4::8]
    np.testing.assert_allclose(got, (c[:, :, 3::8] + c[:, :, 4::8]) / 4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ LFIM


def _np_response(h, w, cut, released, order=2):
    if released:  # the release's grid, written from its description
        yy = np.arange(h)[:, None] / (h - 1)
        xx = np.arange(w // 2 + 1)[None, :] / (w // 2)
        r = np.hypot(yy, xx)
        r = r / max(r.max(), 1.0)
    else:
        r = np.hypot(2 * np.abs(np.fft.fftfreq(h))[:, None], 2 * np.fft.rfftfreq(w)[None, :]) / np.sqrt(2)
    return 1 / (1 + (r / cut) ** (2 * order))


def _np_filter(z, cut, released, high=False):
    resp = _np_response(z.shape[1], z.shape[2], cut, released)
    if high:
        resp = 1 - resp
    spec = np.fft.rfft2(z.astype(np.float64), axes=(1, 2)) * resp[None, :, :, None]
    return np.fft.irfft2(spec, s=z.shape[1:3], axes=(1, 2))


def _sinusoids(h=32, w=32):
    yy, xx = np.mgrid[0:h, 0:w]
    lo = np.cos(2 * np.pi * 1 * xx / w)  # horizontal, 1 cycle
    hi = np.cos(2 * np.pi * 8 * xx / w + 0.3)  # horizontal, 8 cycles
    vert = np.cos(2 * np.pi * 2 * yy / h)  # vertical, 2 cycles
    return lo, hi, vert


def test_butterworth_filters_on_sinusoids():
    h = w = 32
    lo, hi, vert = _sinusoids(h, w)
    z = np.stack([lo + hi, 0.5 * hi, vert, lo - vert], -1)[None].astype(np.float32)
    cut = 0.10

    def factor(ky, kx):  # Butterworth gain of one bin on the centred grid
        r = np.hypot(2 * ky / h, 2 * kx / w) / np.sqrt(2)
        return 1 / (1 + (r / cut) ** 4)

    f_lo, f_hi, f_v = factor(0, 1), factor(0, 8), factor(2, 0)
    assert f_lo > 0.9 and f_hi < 1e-2  # the low sinusoid is kept, the high one attenuated
    expect = np.stack([f_lo * lo + f_hi * hi, 0.5 * f_hi * hi, f_v * vert, f_lo * lo - f_v * vert], -1)[None]
    got = np.asarray(lfim.butterworth_lowpass(jnp.asarray(z), cut))
    np.testing.assert_allclose(got, expect, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lfim.butterworth_highpass(jnp.asarray(z), cut)), z - expect, atol=1e-5)
    for released in (False, True):
        radius = "released" if released else "centred"
        np.testing.assert_allclose(np.asarray(lfim.butterworth_lowpass(jnp.asarray(z), 0.3, radius=radius)),
                                   _np_filter(z, 0.3, released), atol=1e-5)
        np.testing.assert_allclose(np.asarray(lfim.butterworth_highpass(jnp.asarray(z), 0.32, radius=radius)),
                                   _np_filter(z, 0.32, released, high=True), atol=1e-5)


def test_released_grid_differs_from_centred():
    h, w = 32, 40
    r_c, r_r = lfim.radius_grid(h, w, "centred"), lfim.radius_grid(h, w, "released")
    assert r_c.shape == r_r.shape == (h, w // 2 + 1)
    np.testing.assert_allclose(r_c[0], r_r[0], atol=1e-7)  # the horizontal axis agrees
    np.testing.assert_allclose(r_c[1:], r_c[1:][::-1], atol=1e-7)  # centred: +f_y and -f_y alike
    assert r_r[h - 1, 0] > 0.7 and r_c[h - 1, 0] < 0.05  # released: the -1 row counts as (almost) the highest
    vert = np.cos(2 * np.pi * 2 * np.mgrid[0:h, 0:w][0] / h)
    z = jnp.asarray(np.repeat(vert[None, ..., None], 4, -1), jnp.float32)
    a = np.asarray(lfim.butterworth_lowpass(z, 0.10, radius="centred"))
    b = np.asarray(lfim.butterworth_lowpass(z, 0.10, radius="released"))
    assert np.abs(a - b).max() > 0.1


def _np_lfim(z, zl, eps, x_lq, o: lfim.LFIMOptions):
    rel = o.radius == "released"
    hw = z.shape[1:3]
    d = _np_detail(x_lq * 0.5 + 0.5)
    import torch  # bilinear reference = torch's F.interpolate (already checked against jax above)

    msp = torch.nn.functional.interpolate(torch.from_numpy(d[:, None]), size=hw, mode="bilinear",
                                          align_corners=False)[:, 0].numpy().clip(0, 1)[..., None]
    lp_zl = _np_filter(zl, o.low_cut, rel)
    ratio = np.clip(np.sqrt(np.maximum((lp_zl ** 2).sum((1, 2), keepdims=True), 1e-12))
                    / np.sqrt(np.maximum((zl.astype(np.float64) ** 2).sum((1, 2), keepdims=True), 1e-12)), 0, 1)
    mch = 1 / (1 + np.exp(-o.sharp * (ratio - o.tau)))
    a = np.abs(eps.astype(np.float64))
    res = np.stack([_pnorm(x) for x in 0.8 * a.mean(-1) + 0.2 * a.std(-1, ddof=1)])[..., None]
    m_lf = np.stack([_pnorm(x) for x in (1 - msp) * res]) ** o.low_gamma * mch
    z_lo = z + o.low_gain * m_lf * _np_filter(z, o.low_cut, rel)
    delta = _np_filter(z, o.high_cut, rel, high=True) - _np_filter(zl, o.high_cut, rel, high=True)
    z_hi = z + o.high_gain * msp ** o.high_gamma * (1 - mch) * delta
    return o.mix * z_lo + (1 - o.mix) * z_hi, z_lo, z_hi


def _lfim_inputs(seed=6, h=16, w=24):
    rng = np.random.default_rng(seed)
    zl = rng.standard_normal((2, h, w, 4)).astype(np.float32)
    zl[..., 1] = np.cos(2 * np.pi * np.arange(w) / w)[None, None] + 0.05 * zl[..., 1]  # a smooth channel: gate on
    eps = (0.3 * rng.standard_normal((2, h, w, 4))).astype(np.float32)
    x_lq = np.clip(rng.standard_normal((2, 8 * h, 8 * w, 3)) * 0.3, -1, 1).astype(np.float32)
    x_lq[:, : 4 * h] = 0.2  # a flat half, so the detail gate varies
    return zl - eps, zl, eps, x_lq


@pytest.mark.parametrize("radius", ["centred", "released"])
def test_lfim_matches_numpy(radius):
    pytest.importorskip("torch")
    z, zl, eps, x_lq = _lfim_inputs()
    opts = lfim.LFIMOptions(radius=radius)
    ref_mix, ref_lo, ref_hi = _np_lfim(z, zl, eps, x_lq, opts)
    lo_opts = dataclasses.replace(opts, high_gain=0.0)
    hi_opts = dataclasses.replace(opts, low_gain=0.0)

    @jax.jit
    def run(*a):  # one compilation for the three variants and the gate
        return (lfim.lfim(*a, opts), lfim.lfim(*a, lo_opts), lfim.lfim(*a, hi_opts),
                lfim.channel_gate(a[1], 0.10, tau=0.8, sharp=10.0, radius=radius))

    if radius == "released":  # the grid is the only difference: the mixed output suffices
        got = np.asarray(jax.jit(lambda *a: lfim.lfim(*a, opts))(z, zl, eps, x_lq))
        np.testing.assert_allclose(got, ref_mix, atol=1e-5)
        return
    got, lo_only, hi_only, gate = (np.asarray(t) for t in run(z, zl, eps, x_lq))
    assert got.dtype == np.float32 and got.shape == z.shape
    np.testing.assert_allclose(got, ref_mix, atol=1e-5)
    assert np.abs(got - z).max() > 1e-2  # the edit is not a no-op
    np.testing.assert_allclose(lo_only, ref_lo, atol=1e-5)
    np.testing.assert_allclose(hi_only, ref_hi, atol=1e-5)
    assert gate.shape == (2, 1, 1, 4) and gate[:, 0, 0, 1].min() > gate[:, 0, 0, 0].max()  # smooth channel: high


def test_lfim_zero_gains_is_identity():
    z, zl, eps, x_lq = _lfim_inputs(h=8, w=8)
    zj = jnp.asarray(z)
    assert lfim.lfim(zj, zl, eps, x_lq, lfim.LFIMOptions(low_gain=0.0, high_gain=0.0)) is zj
    assert lfim.lfim(z, zl, eps, x_lq, lfim.LFIMOptions(low_gain=0.0, high_gain=-1.0)) is z  # <= 0 disables
    with pytest.raises(ValueError, match="radius"):
        lfim.LFIMOptions(radius="center")


# ----------------------------------------------------------------------------------------------- LPIPS spatial


def test_lpips_spatial_matches_lpips_package():
    torch = pytest.importorskip("torch")
    from torchvision_vgg16_shim import random_vgg_biases_, reference_torchvision

    from jsr.metrics.lpips import lpips_params_from_torch, lpips_spatial

    with reference_torchvision():
        lpips_pkg = pytest.importorskip("lpips")
    torch.manual_seed(0)
    model = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval()
    random_vgg_biases_(model.net, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lin in model.lins:
            wt = lin.model[-1].weight
            wt.copy_(torch.rand(wt.shape, generator=g) / wt.shape[1])
    params = lpips_params_from_torch({k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(7)
    # 24 x 40 is not a multiple of 16: the deeper taps (3 x 5, 1 x 2 after floor pooling) upsample by
    # non-integer factors, the case where resize conventions differ most.
    x = rng.random((2, 24, 40, 3)).astype(np.float32)
    y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y)), normalize=True)
    ref = ref.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lpips_spatial)(params, jnp.asarray(x), jnp.asarray(y)))
    assert got.shape == (2, 24, 40, 1) == ref.shape
    assert rel_error(got, ref) < 1e-4
    assert jax.eval_shape(lpips_spatial, params, x[0], y[0]).shape == (24, 40, 1)  # unbatched
