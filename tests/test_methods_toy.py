"""A new method is one module: a toy method defined *here*, registered, trained through train.py's code path,
exported, and used by ``python -m jsr.infer`` and ``evaluate.py`` with its own knob, with no jsr file edited.

The toy method: a trainable non-LoRA module (a per-pixel linear map of the latent, ``refiner``), its own loss
(latent MSE to the HQ latent), one knob (``toy_gain``): ``z = z_L + toy_gain * refiner(z_L)``. It never calls the
UNet, so it compiles in seconds. The command-line tools see it through ``JSR_METHODS=tests.test_methods_toy``
(the registry imports the modules named there), as a user's own package would be named.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import jsr.methods
from jsr.methods import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.methods.common import optimizer
from jsr.sr import generator
from tests.helpers import one_device_xla_flags

ROOT = Path(__file__).resolve().parents[1]


class Toy(Method):
    """``z = z_L + toy_gain * (z_L W + b)``, ``W``/``b`` trained on ``|z - E(x_HQ)|^2``."""

    name = "toy"
    label = "Toy"
    roles = {"refiner": "the latent refiner (a module, not a LoRA)"}
    required_roles = ("refiner",)  # forward reads it
    knobs = (Knob("toy_gain", float, 1.0, "toy: strength of the refinement", min=0.0, max=2.0, needs="refiner",
                  needs_text="a toy refiner"),)

    def config(self):
        return ml_collections.ConfigDict(dict(init_scale=0.1))

    def forward(self, models, unet_params, trees, z_lq, c, knobs):
        r = trees["refiner"]["proj"]
        return z_lq + knobs["toy_gain"] * (z_lq @ r["kernel"] + r["bias"])

    def inference_trees(self, params, frozen):
        return {"refiner": params["refiner"]["refiner"]}

    def module_template(self, role, config, base):
        n = config["channels"]
        return {"proj": {"kernel": jax.ShapeDtypeStruct((n, n), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((n,), jnp.float32)}}

    def setup(self, config, base, rng):
        m = base.models
        n = base.models.unet.config.in_channels
        w = config.toy.init_scale * jax.random.normal(rng, (n, n), jnp.float32)
        params = {"refiner": {"refiner": {"proj": {"kernel": w, "bias": jnp.zeros((n,), jnp.float32)}}}}

        def loss(params, frozen, batch, rng_, carry):
            x_lq, x_hq = batch["lq"] * 2 - 1, batch["hq"] * 2 - 1
            z_lq = generator.encode(m, frozen["vae"], x_lq)
            z_hq = jax.lax.stop_gradient(generator.encode(m, frozen["vae"], x_hq))
            z = self.forward(m, frozen["unet"], self.inference_trees(params, frozen), z_lq, batch["c"],
                             {"toy_gain": 1.0})
            mse = jnp.mean(jnp.square(z - z_hq))
            return mse, ({"latent_mse": mse}, None)

        return TrainSetup(params=params, phases=[(0, [Update("refiner", loss, optimizer(config))])],
                          frozen={"unet": base.unet_params, "vae": base.vae_params},
                          export={"refiner": {"refiner": ExportEntry("refiner", {"channels": n})}})


jsr.methods.register(Toy)


def _env():
    return dict(os.environ, JSR_METHODS="tests.test_methods_toy", XLA_FLAGS=one_device_xla_flags())


def _config():
    from configs import base

    c = base.tiny(base.get_config("toy"))
    c.total_steps = 2
    c.optim.lr = 1e-2
    c.log.image_every = 1  # the preview runs the method's forward through the loop
    c.mesh.num_devices = 1
    return c


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    from jsr.train import loop

    work = tmp_path_factory.mktemp("toy")
    out = loop.train(_config(), work)
    assert out["status"] == "done" and out["step"] == 2
    return work, out


def test_toy_trains_and_exports_with_a_manifest(toy_export):
    work, out = toy_export
    assert np.isfinite(out["metrics"]["refiner/latent_mse"])
    w = np.asarray(out["state"].params["refiner"]["refiner"]["proj"]["kernel"])
    from jsr.sr.base import load_base
    from jsr.train import loop

    init = loop.build(_config(), load_base(""), jax.random.fold_in(jax.random.key(0), 1))[1].params
    assert not np.array_equal(w, np.asarray(init["refiner"]["refiner"]["proj"]["kernel"]))  # it trained
    manifest = json.loads((work / "export" / "refiner" / "jsr_export.json").read_text())
    assert manifest["method"] == "toy" and manifest["trees"]["refiner"] == {"role": "refiner", "kind": "module"}
    assert manifest["base"]["random_weights"] is True
    # PyTorch-readable: a Linear layer's weight [out, in] and the module config.
    from jsr.weights.io import read_safetensors

    state = read_safetensors(work / "export" / "refiner" / "refiner" / "model.safetensors")
    np.testing.assert_array_equal(state["proj.weight"], w.T)
    assert json.loads((work / "export" / "refiner" / "refiner" / "config.json").read_text()) == {"channels": 4}


def test_toy_restores_through_jsr_infer_with_its_knob(toy_export, tmp_path):
    work, _ = toy_export
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(src / "a.png")
    outs = {}
    for gain in ("0", "1.5"):
        cmd = [sys.executable, "-m", "jsr.infer", str(src), "--model", "tiny", "--lora", str(work / "export"),
               "--toy_gain", gain, "--color_fix", "none", "--output", str(tmp_path / gain), "--no_progress"]
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "with toy" in r.stderr
        outs[gain] = np.asarray(Image.open(tmp_path / gain / "a_sr.png"), np.float32)
    assert outs["0"].shape == (64, 64, 3)
    assert np.abs(outs["0"] - outs["1.5"]).mean() > 0.5  # the knob moves the output
    r = subprocess.run([sys.executable, "-m", "jsr.infer", str(src), "--model", "tiny", "--lora", str(work / "export"),
                        "--toy_gain", "3", "--no_progress"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "toy_gain must be in [0, 2], got 3.0" in r.stderr


def test_toy_sweeps_its_knob_in_evaluate_py(toy_export, tmp_path):
    work, _ = toy_export
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    lq.mkdir()
    hq.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(lq / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(hq / f"{name}.png")
    out = tmp_path / "eval"
    cmd = [sys.executable, "evaluate.py", "--model=", f"--lora={work / 'export'}", "--toy_gain=0,1",
           f"--dataset=T:lq={lq},hq={hq}", "--pyiqa=none", f"--out={out}", "--noprogress", "--num_samples=0"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["method"] == "toy" and report["model"]["sweep"] == "toy_gain"
    assert [row["label"] for row in report["rows"]] == ["Toy (toy_gain=0.0)", "Toy (toy_gain=1.0)"]
    assert report["rows"][0]["psnr"] != report["rows"][1]["psnr"]
    assert "| toy_gain |" in (out / "results.md").read_text()
