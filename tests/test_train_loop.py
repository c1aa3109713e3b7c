"""End-to-end training on the embedded tiny model: CTSR stage 1 -> stage 2 through train.py, exact
kill-and-resume, SIGTERM checkpointing, non-finite steps caught, and the sharded step equal to one device.

Every run compiles a UNet forward+backward, so the runs share JAX's persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``, set per test session in conftest.py) and use few steps.
"""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ctsr, fidelity, osediff, pisasr
from jsr.train import loop
from tests.helpers import one_device_xla_flags, override

ROOT = Path(__file__).resolve().parents[1]


def _config(name="osediff", **over):
    # Without LPIPS, on one device. Compiling is most of a tiny run's cost, and on XLA:CPU loading a program from
    # the persistent cache is not free either (2-core CPU, 2026-11-23: OSEDiff's step compiles in 140 s and loads
    # in 63 s; the fidelity step 87 s and 25 s), so the tests that call the loop several times (resume, NaN) and
    # the 2x2x2-mesh test run the fidelity step (one UNet LoRA update: what the sharding rules act on); OSEDiff
    # (two updates per step: the generator with VSD, then the fake score on the carried latent) runs in its own
    # test.
    c = {"fidelity": fidelity, "osediff": osediff, "pisasr": pisasr}[name].get_config("tiny")
    c.loss.lpips = 0.0
    c.total_steps = 4
    c.checkpoint.every = 2
    c.log.image_every = 0
    c.mesh.num_devices = 1
    return override(c, over)


@contextlib.contextmanager
def _sigterm_while_fetching_batch(index: int):
    """Deliver a real SIGTERM to this process when the loop fetches batch ``index`` (as a preempted VM would
    mid-step); the loop must finish that step, checkpoint and exit."""
    real = loop.make_iterator

    class Signalling:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            if self.n == index:
                os.kill(os.getpid(), signal.SIGTERM)
            self.n += 1
            return next(self.it)

        def __getattr__(self, name):
            return getattr(self.it, name)

    loop.make_iterator = lambda cfg: Signalling(real(cfg))
    try:
        yield
    finally:
        loop.make_iterator = real


def _params(summary):
    return jax.tree.map(np.asarray, jax.device_get(summary["state"].params))


def test_kill_and_resume_gives_the_uninterrupted_parameters(tmp_path):
    ref = loop.train(_config("fidelity"), tmp_path / "ref")
    assert ref["status"] == "done" and ref["step"] == 4
    assert np.isfinite(ref["metrics"]["gen/loss"]) and ref["metrics"]["gen/rec_l2"] > 0

    run = tmp_path / "run"
    with _sigterm_while_fetching_batch(0):  # a real SIGTERM during step 0 -> saved at the step boundary
        pre = loop.train(_config("fidelity"), run)
    assert pre["status"] == "preempted" and pre["step"] == 1
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    with pytest.raises(SystemExit, match="simulated crash"):
        loop.train(_config("fidelity", **{"debug.crash_after_step": 3}), run)  # dies after step 3; last checkpoint is 2
    # As a new process would: the step is read back from the program cache on disk (jsr.train.program_cache), not
    # traced, and still gives the uninterrupted run's parameters bit for bit.
    loop._STEPS.clear()
    done = loop.train(_config("fidelity"), run)  # resumes from step 2
    assert done["status"] == "done" and done["step"] == 4
    assert {p.source for p in loop._STEPS.values()} == {"disk"}
    jax.tree.map(np.testing.assert_array_equal, _params(done), _params(ref))
    assert (run / "export" / "gen" / "unet" / "adapter_model.safetensors").is_file()
    assert (run / "tensorboard").is_dir() and (run / "config.json").is_file()


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    out = loop.train(_config("fidelity", **{"total_steps": 2, "debug.nan_steps": (1,)}), tmp_path / "a")
    assert out["metrics"]["gen/skipped"] == 1.0 and out["metrics"]["nonfinite_steps"] == 1.0
    with pytest.raises(loop.NonFiniteLossError, match="step 2: 2 consecutive"):
        loop.train(_config("fidelity", **{"total_steps": 4, "max_nonfinite": 2, "debug.nan_steps": (0, 1, 2, 3)}),
                   tmp_path / "b")


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    """The loop's step on a 2x2x2 mesh (``loop.jit_step``: traced under the mesh, activations constrained by the
    rules, remat ``blocks``) against the plain one-device step without remat. Slow (373 s of compiling the 8-device
    step on the 2-core CPU, 2026-11-30); the default run keeps the same mesh's remat + constraints gradient check
    (tests/test_activation_sharding.py) and the loop's tracing under the mesh."""
    from jsr.sr.base import load_base
    from jsr.train import sharding
    from jsr.train.step import init_state, make_train_step

    # AdamW's first step maps a gradient g to lr * g / (|g| + eps): with eps 1e-8 the round-off of gradients that
    # cancel to ~1e-10 became parameter differences of 1e-6 (seen once: 1.07e-6 at one of 256 entries, with or
    # without remat), so eps is 1e-6 here, which bounds that amplification at lr / eps = 50.
    c = _config("fidelity", **{"model.remat": "blocks", "optim.eps": 1e-6})
    base = load_base("", dtype=jnp.float32)
    _, setup = loop.build(c, base, jax.random.key(1))
    state = init_state(setup.params, setup.all_updates, 0)
    rng = np.random.default_rng(0)
    batch = {"hq": rng.uniform(size=(8, 64, 64, 3)).astype(np.float32),
             "lq": rng.uniform(size=(8, 64, 64, 3)).astype(np.float32),
             "c": np.asarray(base.prompts(["a photo"] * 8))}
    ref_state, ref_m = jax.jit(make_train_step(setup.phases[0][1]))(state, setup.frozen, batch)
    remat_base = loop.with_remat(base, *loop.remat_setting(c))
    _, remat_setup = loop.build(c, remat_base, jax.random.key(1))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)  # every kind of parallelism at once
    frozen_sh = loop._frozen_shardings(setup.frozen, base, mesh, True)
    rep = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: rep, state)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    step = loop.jit_step(remat_setup.phases[0][1], c, mesh, sharding.DEFAULT_RULES, (state_sh, frozen_sh, batch_sh),
                         (state_sh, rep))
    out_state, m = step(jax.device_put(state, state_sh), jax.device_put(setup.frozen, frozen_sh),
                        jax.device_put(batch, batch_sh))
    specs = [s.spec for s in jax.tree.leaves(frozen_sh["unet"])]
    assert any("fsdp" in spec for spec in specs)  # the frozen base really is FSDP-sharded...
    assert any("tensor" in spec for spec in specs)  # ...and tensor-sharded
    # Same math on 8 devices with a different reduction order: f32 round-off only. The gradients agree to ~1e-6
    # relative; AdamW's first step (B factors start at 0, update ~ lr * g / (|g| + eps)) amplifies the round-off
    # of gradients near eps, hence the absolute floor (measured max |diff| 7e-8 at lr 5e-5).
    for a, b in zip(jax.tree.leaves(out_state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["gen/loss"], ref_m["gen/loss"], rtol=1e-5)


def test_ctsr_stage1_then_stage2_through_train_py(tmp_path):
    env = dict(os.environ, XLA_FLAGS=one_device_xla_flags())
    s1 = tmp_path / "s1"
    cmd = [sys.executable, "train.py", "--config", "configs/ctsr.py:stage1-tiny", "--workdir", str(s1),
           "--config.total_steps=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training done at step 2" in r.stdout
    student = s1 / "export" / "student"
    assert (student / "unet" / "adapter_model.safetensors").is_file()
    s2 = tmp_path / "s2"
    cmd = [sys.executable, "train.py", "--config", "configs/ctsr.py:stage2-tiny", "--workdir", str(s2),
           "--config.total_steps=2", f"--config.ctsr.stage1={student}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (s2 / "export" / "control" / "unet" / "adapter_model.safetensors").is_file()
    assert "ctrl" in r.stderr  # the control loss was logged


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_osediff_trains_generator_and_fake_score(tmp_path):
    from jsr.sr.base import load_base

    c = _config("osediff", total_steps=1)
    init = loop.build(c, load_base(""), jax.random.fold_in(jax.random.key(c.seed), 1))[1].params
    out = loop.train(c, tmp_path)
    m = out["metrics"]
    for k in ("gen/rec_l2", "gen/vsd", "fake/fake_score"):  # both updates of the step ran, VSD included
        assert np.isfinite(m[k]) and m[k] != 0.0, k
    trained = _params(out)
    assert _changed(init["gen"], trained["gen"]) and _changed(init["fake"], trained["fake"])
    assert (tmp_path / "export" / "gen" / "vae" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "export" / "fake").exists()  # the fake score is a training device, not a result


def test_pisa_switches_from_pixel_to_semantic_phase(tmp_path):
    out = loop.train(_config("pisasr", total_steps=2, **{"pisasr.pixel_steps": 1}), tmp_path)
    m = out["metrics"]  # step 2 is the semantic phase: l2 + CSD on the sem LoRA, the pixel LoRA frozen
    assert np.isfinite(m["sem/csd"]) and m["sem/csd"] != 0.0 and "pix/loss" not in m
    for group in ("pix", "sem"):
        assert (tmp_path / "export" / group / "unet" / "adapter_model.safetensors").is_file()
        b = [x for path, x in jax.tree_util.tree_flatten_with_path(_params(out)[group])[0]
             if jax.tree_util.keystr(path).endswith("['b']")]
        assert any(np.abs(x).max() > 0 for x in b), group  # B factors start at 0: non-zero means trained


def test_real_base_without_teachers_is_an_error(tmp_path):
    # A folder that is not jsr's random stand-in (no _jsr_preset in model_index.json) must not get random teachers.
    import json
    import shutil

    from jsr.sr.base import load_base

    tiny = load_base("").path
    real = tmp_path / "sd"
    shutil.copytree(tiny, real)
    index = json.loads((real / "model_index.json").read_text())
    del index["_jsr_preset"]
    (real / "model_index.json").write_text(json.dumps(index))
    base = load_base(real)
    assert load_base("").random_weights and not base.random_weights
    c = ctsr.get_config("stage1-tiny")
    c.loss.lpips = 0.0  # else the missing LPIPS weights are reported first
    with pytest.raises(ValueError, match="realism teacher LoRA"):
        loop.build(c, base, jax.random.key(0))
    c = fidelity.get_config("tiny")
    with pytest.raises(ValueError, match="needs LPIPS weights"):
        loop.build(c, base, jax.random.key(0))


def test_config_variants_and_errors():
    assert ctsr.get_config("stage2").ctsr.stage == 2
    with pytest.raises(ValueError, match="unknown variant"):
        ctsr.get_config("stage3")
    with pytest.raises(ValueError, match="unknown variant"):
        osediff.get_config("huge")
