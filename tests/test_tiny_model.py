"""The embedded tiny random model (``jsr.weights.tiny``): written without compiling anything, deterministic in its
seed, with Flax-default-like weight statistics, and loadable by diffusers."""
import hashlib

import jax
import numpy as np
import pytest

from jsr.models.common import random_params
from jsr.weights import tiny

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The tiny model written once (seed 0), with the XLA compiles that happened meanwhile."""
    compiles = []

    def listen(event, duration, **_):
        if event == BACKEND_COMPILE:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        folder = tiny.write_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd", seed=0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return folder, compiles


def test_written_without_compiling_and_deterministic(written, tmp_path):
    """The README's first command starts here: drawing the weights with numpy from abstract shapes compiles no XLA
    program (compiling the tiny UNet's init took ~60 s of CPU on the 2-core machine). Same seed, same bytes."""
    folder, compiles = written
    assert compiles == []
    again = tiny.write_tiny_sd(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(folder) and len(_digest(folder)) >= 9
    assert not list(tmp_path.glob("*.tmp*")) and not list(folder.parent.glob("*.tmp*"))  # renamed into place


def test_weights_follow_flax_defaults_plus_noise():
    """kernel ~ N(0, 1/fan_in), bias ~ 0, scale ~ 1 (each + N(0, 0.02^2)); seeds differ; leaves keyed by path."""
    from jsr.weights.vae import vae_from_config

    vae = vae_from_config(tiny.preset("tiny")["vae"])
    p0, p1 = random_params(vae, 0), random_params(vae, 1)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(p0)[0]}
    kernels = [v for k, v in flat.items() if k.endswith("['kernel']") and v.size >= 2048]
    assert kernels
    for v in kernels:
        fan_in = int(np.prod(v.shape[:-1]))
        assert abs(v.std() / np.sqrt(1 / fan_in + 0.02**2) - 1) < 0.1
    biases = np.concatenate([v for k, v in flat.items() if k.endswith("['bias']")])
    scales = np.concatenate([v for k, v in flat.items() if k.endswith("['scale']")])
    assert abs(biases.mean()) < 0.01 and abs(biases.std() - 0.02) < 0.005
    assert abs(scales.mean() - 1) < 0.01 and abs(scales.std() - 0.02) < 0.005
    assert all(v.dtype == np.float32 for v in flat.values())
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


def test_diffusers_loads_it(written):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    folder = written[0]
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        out = vae(torch.rand(1, 3, 32, 32) * 2 - 1).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all() and out.std() > 1e-3


def test_a_concurrent_writer_leaves_no_temporary_folder(written, tmp_path):
    """Two processes writing the same folder (a 2-process train.py on a fresh cache): the loser's rename fails on
    the winner's complete folder; its temporary copy is deleted, the winner's kept."""
    winner = written[0]
    before = _digest(winner)
    loser = winner.with_name("sd.tmp999")
    loser.mkdir()
    (loser / "model_index.json").write_text("{}")
    tiny._publish(loser, winner, "model_index.json")
    assert not loser.exists() and _digest(winner) == before
    with pytest.raises(OSError):  # no complete folder at the target: the failure is not hidden
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("not a model")
        broken = tmp_path / "b.tmp1"
        broken.mkdir()
        (broken / "y").write_text("y")
        tiny._publish(broken, tmp_path / "other", "model_index.json")


def test_random_stand_ins_also_trace():
    """The host-drawn stand-ins (random LPIPS trunk, random teacher LoRAs) inside ``jax.eval_shape``, as
    benchmarks/export_programs.py builds a full-size set-up from abstract weights: same shapes, no error."""
    import types

    import ml_collections

    from jsr.methods import common
    from jsr.models import lora as L
    from jsr.weights.vae import vae_from_config

    cfg = ml_collections.ConfigDict({"loss": {"lpips": 2.0, "lpips_vgg": "", "lpips_heads": ""}})
    random_base = types.SimpleNamespace(random_weights=True)
    concrete = common.lpips_params(cfg, random_base, jax.random.key(0))
    traced = jax.eval_shape(lambda k: common.lpips_params(cfg, random_base, k), jax.random.key(0))
    assert jax.tree.map(np.shape, concrete) == jax.tree.map(lambda a: a.shape, traced)
    vae = random_params(vae_from_config(tiny.preset("tiny")["vae"]), 0)
    lo = common.random_lora(jax.random.key(1), vae, L.OSEDIFF_VAE)
    lo_traced = jax.eval_shape(lambda k: common.random_lora(k, vae, L.OSEDIFF_VAE), jax.random.key(1))
    assert jax.tree.map(np.shape, lo.factors) == jax.tree.map(lambda a: a.shape, lo_traced.factors)
    assert all(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(lo.factors))  # b is not zero
