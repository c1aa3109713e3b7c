"""Every loss against an independent PyTorch computation on toy score networks, including the gradient
structure (what receives gradient and how much).

The toy score network ``eps(z, t, c) = tanh(z W + (t/1000) b + mean_L(c) P)`` is written twice, in JAX and in
torch; the torch side follows the papers' code paths (OSEDiff ``distribution_matching_loss`` / ``diff_loss``,
PiSA-SR ``cal_csd``, CTSR Alg. 1 / Eq. 8) with diffusers' own ``alphas_cumprod`` and autograd. Tolerances: both
sides are float32 on CPU; rtol 1e-5 / atol 1e-6 covers reduction-order differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.sr import generator
from jsr.sr import losses as L
from jsr.sr import schedule as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, H, W, C, LEN, D = 2, 4, 5, 4, 3, 6
RTOL, ATOL = 1e-5, 1e-6
CFG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def _net_params(seed):
    r = np.random.default_rng(seed)
    return {"w": (r.standard_normal((C, C)) * 0.5).astype(np.float32),
            "b": r.standard_normal((C,)).astype(np.float32),
            "p": (r.standard_normal((D, C)) * 0.5).astype(np.float32)}


def jax_net(p):
    def eps(z, t, c):
        h = z @ p["w"] + (t / 1000.0)[:, None, None, None] * p["b"] + (jnp.mean(c, axis=1) @ p["p"])[:, None, None, :]
        return jnp.tanh(h)
    return eps


def torch_net(p):
    def eps(z, t, c):
        h = z @ p["w"] + (t / 1000.0)[:, None, None, None] * p["b"] + (c.mean(1) @ p["p"])[:, None, None, :]
        return torch.tanh(h)
    return eps


def tt(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def tparams(p, grad=False):
    return {k: tt(v, grad) for k, v in p.items()}


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(0)
    return {"z": r.standard_normal((B, H, W, C)).astype(np.float32),
            "z_gt": r.standard_normal((B, H, W, C)).astype(np.float32),
            "noise": r.standard_normal((B, H, W, C)).astype(np.float32),
            "c": r.standard_normal((B, LEN, D)).astype(np.float32),
            "c_neg": r.standard_normal((1, LEN, D)).astype(np.float32)}


@pytest.fixture(scope="module")
def sched():
    return S.DDPMSchedule.from_config(CFG)


def _abar_torch(t):
    ac = diffusers.DDPMScheduler(**CFG).alphas_cumprod
    return ac[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1)


def _eps_to_mu(eps, z_t, abar):
    return (z_t - (1 - abar) ** 0.5 * eps) / abar ** 0.5


def _close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b, rtol=rtol, atol=atol)


def test_reconstruction_loss(data):
    r = np.random.default_rng(3)
    x, y = (r.uniform(-1, 1, (B, 16, 16, 3)).astype(np.float32) for _ in range(2))
    toy = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))  # noqa: E731
    loss, parts = L.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), toy, l2_weight=1.0, lpips_weight=2.0)
    want = np.mean((x - y) ** 2) + 2.0 * np.mean(np.abs(x - y))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert set(parts) == {"rec", "rec_l2", "rec_lpips"}
    with pytest.raises(ValueError, match="lpips_fn"):
        L.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), None)


def test_lpips_loss_fn_takes_minus_one_to_one_images():
    from jsr.metrics.lpips import LPIPS, lpips_distance
    from jsr.models.common import abstract_params

    # Random weights straight from the shapes (a full VGG16 init costs seconds); heads non-negative as in LPIPS.
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(np.abs(r.standard_normal(a.shape)).astype(np.float32) * 0.05),
                          abstract_params(LPIPS()))
    r = np.random.default_rng(4)
    x, y = (jnp.asarray(r.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)) for _ in range(2))
    d = L.lpips_loss_fn(params)(x, y)
    np.testing.assert_allclose(np.asarray(d), np.asarray(lpips_distance(params, (x + 1) / 2, (y + 1) / 2)),
                               rtol=1e-5)


def test_vsd_matches_osediff_reference_and_gradient(data, sched):
    real, fake = _net_params(1), _net_params(2)
    t = np.array([20, 979])
    fn = lambda z: L.vsd_loss(z, jnp.asarray(data["c"]), jnp.asarray(data["c_neg"]), None,  # noqa: E731
                              real_eps=jax_net(real), fake_eps=jax_net(fake), schedule=sched, cfg_scale=7.5,
                              t=jnp.asarray(t), noise=jnp.asarray(data["noise"]))
    (loss, parts), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(data["z"]))

    # OSEDiff distribution_matching_loss, in torch.
    z = tt(data["z"], grad=True)
    abar = _abar_torch(t)
    noisy = abar ** 0.5 * z + (1 - abar) ** 0.5 * tt(data["noise"])
    with torch.no_grad():
        tq = torch.tensor(t, dtype=torch.float32)
        x_fake = _eps_to_mu(torch_net(tparams(fake))(noisy, tq, tt(data["c"])), noisy, abar)
        rn = torch_net(tparams(real))
        neg = rn(noisy, tq, tt(data["c_neg"]).expand(B, -1, -1))
        pos = rn(noisy, tq, tt(data["c"]))
        x_real = _eps_to_mu(neg + 7.5 * (pos - neg), noisy, abar)
    w = torch.abs(z - x_real).mean(dim=[1, 2, 3], keepdim=True)
    g = (x_fake - x_real) / w
    ref = torch.nn.functional.mse_loss(z, (z - g).detach())
    ref.backward()
    _close(loss, ref)
    _close(grad, z.grad)
    _close(grad, 2 * g / z.numel())  # the analytic gradient of the DMD form
    _close(parts["vsd_w"], w.mean())
    assert float(parts["vsd_t"]) == t.mean()


def test_fake_score_loss_matches_osediff_reference(data, sched):
    fake = _net_params(2)
    t = np.array([0, 999])
    fn = lambda p: L.fake_score_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), None,  # noqa: E731
                                     fake_output=jax_net(p), schedule=sched, t=jnp.asarray(t),
                                     noise=jnp.asarray(data["noise"]))[0]
    loss, grads = jax.value_and_grad(fn)(jax.tree.map(jnp.asarray, fake))
    tp = tparams(fake, grad=True)
    abar = _abar_torch(t)
    z = tt(data["z"], grad=True)  # OSEDiff detaches the latents: no gradient may reach them
    noisy = abar ** 0.5 * z.detach() + (1 - abar) ** 0.5 * tt(data["noise"])
    ref = torch.nn.functional.mse_loss(torch_net(tp)(noisy, torch.tensor(t, dtype=torch.float32), tt(data["c"])),
                                       tt(data["noise"]))
    ref.backward()
    _close(loss, ref)
    for k in fake:
        _close(grads[k], tp[k].grad)
    zgrad = jax.grad(lambda z: L.fake_score_loss(z, jnp.asarray(data["c"]), jax.random.key(0),
                                                 fake_output=jax_net(fake), schedule=sched)[0])(jnp.asarray(data["z"]))
    assert not np.any(np.asarray(zgrad))


def test_fake_score_v_prediction_target(data):
    vs = S.DDPMSchedule.from_config(dict(CFG, prediction_type="v_prediction"))
    t = jnp.asarray([5.0, 600.0])
    x0, n = jnp.asarray(data["z"]), jnp.asarray(data["noise"])
    perfect = lambda z_t, tq, c: S.velocity(vs, x0, n, tq)  # noqa: E731
    loss, _ = L.fake_score_loss(x0, jnp.asarray(data["c"]), None, fake_output=perfect, schedule=vs, t=t, noise=n)
    assert float(loss) < 1e-10


def test_csd_matches_pisasr_reference(data, sched):
    base = _net_params(5)
    t = np.array([20, 499])
    fn = lambda z: L.csd_loss(z, jnp.asarray(data["c"]), jnp.asarray(data["c_neg"]), None,  # noqa: E731
                              base_eps=jax_net(base), schedule=sched, cfg_scale=7.5, t=jnp.asarray(t),
                              noise=jnp.asarray(data["noise"]))
    (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(data["z"]))
    z = tt(data["z"], grad=True)
    abar = _abar_torch(t)
    noisy = abar ** 0.5 * z + (1 - abar) ** 0.5 * tt(data["noise"])
    with torch.no_grad():
        tq = torch.tensor(t, dtype=torch.float32)
        net = torch_net(tparams(base))
        unc = net(noisy, tq, tt(data["c_neg"]).expand(B, -1, -1))
        txt = net(noisy, tq, tt(data["c"]))
        x_real = _eps_to_mu(unc + 7.5 * (txt - unc), noisy, abar)
        x_fake = _eps_to_mu(unc, noisy, abar)
    w = torch.abs(z - x_real).mean(dim=[1, 2, 3], keepdim=True)
    g = (x_fake - x_real) / w
    ref = torch.nn.functional.mse_loss(z, (z - g).detach())
    ref.backward()
    _close(loss, ref)
    _close(grad, z.grad)
    _close(grad, 2 * g / z.numel())


def test_timestep_draws_stay_in_range(data, sched):
    net = jax_net(_net_params(1))
    ts = []
    for i in range(20):
        _, p = L.csd_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), jnp.asarray(data["c_neg"]),
                          jax.random.key(i), base_eps=net, schedule=sched, t_min=20, t_max=22)
        ts.append(float(p["csd_t"]))
    assert min(ts) >= 20 and max(ts) <= 21 and len(set(ts)) > 1
    a = L.vsd_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), jnp.asarray(data["c_neg"]), jax.random.key(7),
                   real_eps=net, fake_eps=net, schedule=sched)[0]
    b = L.vsd_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), jnp.asarray(data["c_neg"]), jax.random.key(7),
                   real_eps=net, fake_eps=net, schedule=sched)[0]
    assert float(a) == float(b)  # same key, same draw


def test_dual_teacher_matches_ctsr_alg1_with_full_backprop(data, sched):
    stu, tf, tr = _net_params(6), _net_params(7), _net_params(8)
    t = np.array([100, 900])

    def fn(z0s, sp):
        return L.dual_teacher_loss(z0s, jnp.asarray(data["z_gt"]), jnp.asarray(data["c"]), None,
                                   student_eps=jax_net(sp), fidelity_eps=jax_net(tf), realism_eps=jax_net(tr),
                                   schedule=sched, g_time=5.5, fl_weight=2.0, rn_weight=1.0, t=jnp.asarray(t),
                                   noise=jnp.asarray(data["noise"]))

    (loss, parts), (gz, gp) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(data["z"]), jax.tree.map(jnp.asarray, stu))

    # CTSR Alg. 1 lines 6-13 in torch, plain autograd.
    z0s = tt(data["z"], grad=True)
    sp = tparams(stu, grad=True)
    abar = _abar_torch(t)
    n = tt(data["noise"])
    zt = abar ** 0.5 * tt(data["z_gt"]) + (1 - abar) ** 0.5 * n
    zst = abar ** 0.5 * z0s + (1 - abar) ** 0.5 * n
    tq, c = torch.tensor(t, dtype=torch.float32), tt(data["c"])
    mse = torch.nn.functional.mse_loss
    S_, Tf, Tr = torch_net(sp), torch_net(tparams(tf)), torch_net(tparams(tr))
    l_fl = mse(Tf(zst, tq, c), S_(zst, tq, c)) + 5.5 * mse(Tf(zt, tq, c), Tf(zst, tq, c))
    l_rn = mse(Tr(zst, tq, c), S_(zst, tq, c)) + 5.5 * mse(Tr(zt, tq, c), Tr(zst, tq, c))
    ref = 2.0 * l_fl + 1.0 * l_rn
    ref.backward()
    _close(loss, ref)
    _close(parts["fl"], l_fl)
    _close(parts["rn"], l_rn)
    _close(gz, z0s.grad)
    for k in stu:
        _close(gp[k], sp[k].grad)


def test_control_loss_matches_eq8_and_trains_only_the_student(data):
    teacher, student = _net_params(9), _net_params(10)
    t1, t2 = np.array([0.1, 0.35]), np.array([0.6, 0.4])

    def fn(sp, tp):
        return L.control_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), None, teacher_eps=jax_net(tp),
                              student_eps=jax_net(sp), t_scale=999.0, t_pair=(jnp.asarray(t1), jnp.asarray(t2)))

    (loss, _), (gs, gt) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        jax.tree.map(jnp.asarray, student), jax.tree.map(jnp.asarray, teacher))
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(gt))

    sp = tparams(student, grad=True)
    T, S_ = torch_net(tparams(teacher)), torch_net(sp)
    z0, c = tt(data["z"]), tt(data["c"])
    a, b = tt(t1).reshape(-1, 1, 1, 1), tt(t2).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        e1 = T(z0, tt(t1) * 999, c)  # eps_TS(z0, t)
        e2 = T(z0, tt(t2) * 999, c)  # eps_TS(z0, t')
    zt = z0 + a * e1  # Eq. 5
    ref = torch.mean((a * e1 - b * e2 + (b - a) * S_(zt, tt(t1) * 999, c)) ** 2)  # Eq. 8
    ref.backward()
    _close(loss, ref)
    for k in student:
        _close(gs[k], sp[k].grad)


def test_control_loss_draws_ordered_pairs(data):
    net = jax_net(_net_params(9))
    for i in range(5):
        _, p = L.control_loss(jnp.asarray(data["z"]), jnp.asarray(data["c"]), jax.random.key(i),
                              teacher_eps=net, student_eps=net)
        assert 0.0 <= float(p["ctrl_t"]) <= float(p["ctrl_t2"]) <= 1.0


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_control_latent(data, steps):
    net = jax_net(_net_params(11))
    z0, c = jnp.asarray(data["z"]), jnp.asarray(data["c"])
    np.testing.assert_array_equal(np.asarray(generator.control_latent(z0, 0.0, c, student_eps=net, steps=steps)),
                                  np.asarray(z0))
    got = np.asarray(generator.control_latent(z0, jnp.asarray([0.3, 0.8]), c, student_eps=net, steps=steps))
    tn = torch_net(tparams(_net_params(11)))
    tv = torch.tensor([0.3, 0.8])
    z = tt(data["z"])
    if steps == 0:
        want = z + tv.reshape(-1, 1, 1, 1) * tn(z, tv * 999, tt(data["c"]))
    else:
        for k in range(steps):
            z = z + (tv / steps).reshape(-1, 1, 1, 1) * tn(z, tv * k / steps * 999, tt(data["c"]))
        want = z
    _close(got, want)


def test_score_distillation_weight_map_and_eps():
    """FiDeSR's weighted form: ``w = mean|z - x_real| + eps`` per sample, ``g = (x_fake - x_real) / w``, the loss
    ``mean(W * g^2)`` with its gradient ``2 W g / size`` (``W`` the weight map, broadcast over channels); eps 0
    and no map give back the plain form."""
    from jsr.sr.losses import score_distillation

    rng = np.random.default_rng(0)
    z, xr, xf = (rng.normal(size=(2, 4, 6, 4)).astype(np.float32) for _ in range(3))
    wmap = rng.uniform(0.2, 2.0, (2, 4, 6, 1)).astype(np.float32)
    eps = 1e-6
    w = np.abs(z - xr).mean((1, 2, 3), keepdims=True) + eps
    g = (xf - xr) / w
    loss, w_got = score_distillation(jnp.asarray(z), jnp.asarray(xr), jnp.asarray(xf), weight_map=jnp.asarray(wmap),
                                     w_eps=eps)
    np.testing.assert_allclose(float(loss), float((wmap * g ** 2).mean()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w_got), w.reshape(-1), rtol=1e-6)
    grad = jax.grad(lambda zz: score_distillation(zz, jnp.asarray(xr), jnp.asarray(xf),
                                                  weight_map=jnp.asarray(wmap), w_eps=eps)[0])(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(grad), 2 * wmap * g / z.size, rtol=1e-4, atol=1e-7)
    plain, _ = score_distillation(jnp.asarray(z), jnp.asarray(xr), jnp.asarray(xf))
    g0 = (xf - xr) / (w - eps)
    np.testing.assert_allclose(float(plain), float((g0 ** 2).mean()), rtol=1e-5)
    assert not np.isclose(float(plain), float(loss), rtol=1e-3)
