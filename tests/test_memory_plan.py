"""The restorer's memory plan (issue 13, bug 2): each VAE direction runs staged with its carries in memory while
they fit ``max_memory`` beside the image's own buffers, spilled to disk when they do not, blended tiles when the
disk has no room either; the estimate is printed before any work. Planning traces shapes only (no compile, no
parameters), so this runs at full SD-2.1 VAE size."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models.presets import preset
from jsr.models.vae import AutoencoderKL, VAEConfig
from jsr.sr import infer
from jsr.sr.infer import GB, Restorer, RestoreOptions
from jsr.sr.staged_tiling import TiledVAE


@pytest.fixture(scope="module")
def sd21_restorer():
    """A restorer whose TiledVAE is SD-2.1's VAE with abstract parameters (shapes only: planning needs no more)."""
    vae = AutoencoderKL(VAEConfig.from_diffusers(preset("sd21-base")["vae"]))
    params = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    models = types.SimpleNamespace(vae=vae, scaling_factor=0.18215)
    unused = lambda *a: None  # noqa: E731 - planning never calls the maps
    return Restorer(unused, unused, unused, method="osediff", tiled_vae=TiledVAE(models, params))


def test_plan_follows_the_budget(sd21_restorer, monkeypatch, tmp_path):
    r = sd21_restorer
    shape = (1, 3072, 4096, 3)  # the 4096x3072 output
    free = r.plan(shape, RestoreOptions())
    assert (free.encode, free.decode, free.disk) == ("staged", "staged", 0)
    # The real VAE keeps 128-256 channels at full resolution: tens of GB of carries for 12.6 Mpx.
    assert free.host > 20 * GB
    image = 3072 * 4096 * 3 * 4
    budget = 4 * GB
    tight = r.plan(shape, RestoreOptions(max_memory=budget))
    assert tight.encode == tight.decode == "spilled"
    assert tight.host <= budget and tight.disk > 10 * GB and tight.host > 5 * image
    assert tight.steps == free.steps
    line = tight.describe()
    assert "VAE encode spilled, decode spilled" in line and "of the 4.00 GB budget" in line and "spilled to" in line
    monkeypatch.setattr(infer, "_free_disk", lambda folder: 0)  # no room to spill: blended tiles, logged as such
    no_disk = r.plan(shape, RestoreOptions(max_memory=budget, spill_dir=str(tmp_path)))  # (plans are cached)
    assert no_disk.encode == no_disk.decode == "blended" and no_disk.disk == 0 and no_disk.host <= budget
    assert no_disk.steps < free.steps  # one call per tile instead of one per stage and tile


def test_small_images_are_never_tiled_and_a_large_budget_keeps_carries_in_memory(sd21_restorer):
    r = sd21_restorer
    small = r.plan((1, 512, 768, 3), RestoreOptions(max_memory=GB))
    assert (small.encode, small.decode) == ("whole", "whole")
    roomy = r.plan((1, 1536, 2048, 3), RestoreOptions(max_memory=1000 * GB))
    assert (roomy.encode, roomy.decode) == ("staged", "staged") and roomy.host < 1000 * GB
    # A budget between the two needs: the direction that fits stays in memory.
    enc = r.tiled_vae.encode_estimate((1, 1536, 2048, 3), 1024, 176)
    dec = r.tiled_vae.decode_estimate((1, 192, 256, 4), 128, 22)
    image = 1536 * 2048 * 3 * 4
    lo, hi = sorted((2 * image + enc.in_memory, image + dec.in_memory))
    mixed = r.plan((1, 1536, 2048, 3), RestoreOptions(max_memory=(lo + hi) // 2))
    assert sorted((mixed.encode, mixed.decode)) == ["spilled", "staged"]


def test_the_plan_is_printed_before_work(capsys):
    from tests.helpers import standin_restorer

    r = standin_restorer()
    steps = []
    opts = RestoreOptions(vae_tile=64, vae_overlap=16, latent_tile=8, latent_overlap=2, max_memory=GB)
    out = r(np.zeros((1, 200, 136, 3), np.float32), opts, steps.append)
    assert out.shape == (1, 200, 136, 3)
    err = capsys.readouterr().err
    assert "jsr: plan: 1 x 136x200: VAE encode blended, decode blended" in err and "of the 1.00 GB budget" in err
    assert len(steps) == r.plan((1, 200, 136, 3), opts).steps
