"""DDPM schedule vs diffusers' DDPMScheduler (the reference implementation of the same formulas)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jsr.sr import schedule as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD21 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def _ref(config):
    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "clip_sample")
    return diffusers.DDPMScheduler(**{k: config[k] for k in keys if k in config})


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(kind):
    cfg = dict(SD21, beta_schedule=kind)
    ours = np.asarray(S.DDPMSchedule.from_config(cfg).alphas_cumprod)
    ref = _ref(cfg).alphas_cumprod.numpy()
    # diffusers accumulates in float32; ours in float64 then rounds: relative error ~ 1000 float32 roundings.
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-7)


def test_load_from_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(SD21, prediction_type="v_prediction")))
    s = S.load_schedule(tmp_path)
    assert s.prediction_type == "v_prediction" and s.num_train_timesteps == 1000
    with pytest.raises(FileNotFoundError, match="scheduler_config"):
        S.load_schedule(tmp_path / "missing")
    with pytest.raises(ValueError, match="beta_schedule"):
        S.DDPMSchedule.from_config(dict(SD21, beta_schedule="sigmoid"))


def test_add_noise_and_x0_step_match_diffusers():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 5, 4)).astype(np.float32)  # NHWC
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 499, 999])
    s = S.DDPMSchedule.from_config(SD21)
    ref = _ref(SD21)
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    from_t = lambda a: a.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    zt_ref = from_t(ref.add_noise(to_t(x0), to_t(noise), torch.from_numpy(t)))
    zt = np.asarray(S.add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(zt, zt_ref, rtol=1e-5, atol=1e-5)
    # x0 from an epsilon output: OSEDiff's one-step scheduler step from t=999 to "t=-1" (abar_prev = 1) returns
    # it. (OSEDiff's diffusers derived the previous step from set_timesteps(1); newer ones look 999 up in the
    # timestep list, so give it explicitly.)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    ref.set_timesteps(timesteps=[999])
    step = ref.step(to_t(eps[2:]), 999, to_t(zt[2:]), generator=torch.Generator().manual_seed(0))
    ours = np.asarray(S.x0_from_eps(s, jnp.asarray(zt[2:]), jnp.asarray(eps[2:]), jnp.asarray([999.0])))
    np.testing.assert_allclose(ours, from_t(step.pred_original_sample), rtol=1e-4, atol=1e-4)
    # the variance term of that step is sqrt(1e-20) * noise: prev_sample == x0 up to 1e-10 * noise.
    np.testing.assert_allclose(ours, from_t(step.prev_sample), rtol=1e-4, atol=1e-4)


def test_v_prediction_conversions_match_diffusers():
    rng = np.random.default_rng(1)
    cfg = dict(SD21, prediction_type="v_prediction")
    s = S.DDPMSchedule.from_config(cfg)
    ref = _ref(cfg)
    x0 = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    n = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([10, 700])
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    v_ref = ref.get_velocity(to_t(x0), to_t(n), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    v = np.asarray(S.velocity(s, jnp.asarray(x0), jnp.asarray(n), jnp.asarray(t)))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5)
    z = S.add_noise(s, jnp.asarray(x0), jnp.asarray(n), jnp.asarray(t))
    # A perfect v prediction recovers x0 and the noise exactly (up to f32 rounding).
    np.testing.assert_allclose(np.asarray(S.x0_from_output(s, z, jnp.asarray(v), jnp.asarray(t))), x0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(S.eps_from_output(s, z, jnp.asarray(v), jnp.asarray(t))), n, atol=1e-4)
    np.testing.assert_allclose(np.asarray(S.training_target(s, jnp.asarray(x0), jnp.asarray(n), jnp.asarray(t))),
                               v_ref, rtol=1e-5, atol=1e-5)


def test_float_timesteps_interpolate_abar_linearly():
    s = S.DDPMSchedule.from_config(SD21)
    table = np.asarray(s.alphas_cumprod, np.float64)
    t = np.array([0.0, 3.0, 10.25, 998.5, 999.0, 1200.0, -4.0])
    want = np.interp(np.clip(t, 0, 999), np.arange(1000), table)
    got = np.asarray(S.alpha_bar(s, jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == table.astype(np.float32)[3]  # integer timesteps read the table exactly
    # x0/eps round trip at a float timestep
    z = jnp.ones((1, 2, 2, 4))
    eps = jnp.full((1, 2, 2, 4), 0.3)
    x0 = S.x0_from_eps(s, z, eps, jnp.asarray([123.4]))
    np.testing.assert_allclose(np.asarray(S.eps_from_x0(s, z, x0, jnp.asarray([123.4]))), 0.3, rtol=1e-5)
