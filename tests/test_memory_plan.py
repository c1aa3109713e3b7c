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


def test_a_replaced_restorer_plans_afresh(sd21_restorer):
    """dataclasses.replace(restorer, tiled_vae=None) once shared the original's plan cache and ran 'staged' with
    no TiledVAE (AttributeError in test_infer's blended comparison): each instance plans for itself."""
    import dataclasses

    shape, opts = (1, 1536, 2048, 3), RestoreOptions()
    assert sd21_restorer.plan(shape, opts).encode == "staged"
    blended = dataclasses.replace(sd21_restorer, tiled_vae=None)
    assert (blended.plan(shape, opts).encode, blended.plan(shape, opts).decode) == ("blended", "blended")
    assert sd21_restorer.plan(shape, opts).encode == "staged"


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


@pytest.mark.slow
def test_a_4096x3072_output_on_the_tiny_model_within_a_stated_peak(tmp_path):
    """The issue's case through the command line: a 1024x768 input (4096x3072 output) on the embedded tiny model
    with --max_memory 1.5G spills the VAE's carries and the process's peak resident memory (getrusage, the whole
    process: runtime, model, compiled programs) stays under 3 GB. For scale: with no budget the staged carries
    are planned at ~5 GB of host memory for this size, and a 2048x1536 output measured 2.55 GB peak with them in
    memory. Measured here: 1.87 GB peak, 32 min (2-core CPU shared with other jobs, load ~5, 2026-11-30)."""
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(src)
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['jsr.infer', {str(src)!r}, '--model', 'tiny', '--method', 'osediff', '--max_memory', '1.5G',"
        f" '--spill_dir', {str(tmp_path)!r}, '-o', {str(tmp_path / 'out')!r}, '--no_progress']\n"
        "try:\n    runpy.run_module('jsr.infer', run_name='__main__')\n"
        "except SystemExit as e:\n    print('RC', e.code)\n"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=7200,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert "RC 0" in r.stdout, r.stderr[-3000:]
    assert "VAE encode spilled, decode spilled" in r.stderr
    with Image.open(tmp_path / "out" / "in_sr.png") as im:
        assert im.size == (4096, 3072)
    peak_gb = int(r.stdout.split("MAXRSS_KB")[1].split()[0]) / 2 ** 20
    print(f"peak resident memory {peak_gb:.2f} GB")
    assert peak_gb < 3.0


def test_plans_with_temporaries_compile_the_stages_once(capsys):
    """Restorer.plan_temporaries (the command lines' setting): planning a staged size compiles the VAE stage
    programs and counts XLA's temporaries; the run then reuses those programs (no stage is lowered again) and
    gives the same image as a restorer that planned without them. Tiny model, a 192x128 image in 64-px tiles."""
    import jax.monitoring

    from jsr.methods.restorer import load_restorer

    lowered: list[float] = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        opts = RestoreOptions(vae_tile=64, vae_overlap=16)
        x = np.random.default_rng(0).random((1, 128, 192, 3), np.float32)
        plain = load_restorer("tiny")
        lowered.clear()
        want = plain(x, opts)
        n_plain = len(lowered)
        measured = load_restorer("tiny")
        measured.plan_temporaries = True
        plan = measured.plan(x.shape, opts)
        assert (plan.encode, plan.decode) == ("staged", "staged")
        assert plan.temporaries > 0
        assert "MB of XLA temporaries" in plan.describe()
        if jax.default_backend() == "cpu":  # the working memory is host memory here
            assert plan.host > plain.plan(x.shape, opts).host
        lowered.clear()
        got = measured(x, opts)
        stages = len(measured.tiled_vae._encoder.stages) + len(measured.tiled_vae._decoder.stages)
        # The plain run lowered every stage program and the rest (latent step, colour fix...); this run lowers
        # none of the stages again (the rest may be shared between the two restorers' jit caches).
        assert n_plain >= stages and len(lowered) <= n_plain - stages
        np.testing.assert_array_equal(got, want)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert "compiling the" in capsys.readouterr().err


def test_lfim_methods_leave_the_pixels_out_when_the_gains_are_off():
    """OSEDiff declares uses_image for LFIM only: at gains 0 (its default) the restorer leaves the 192 pixel
    channels out of the tiled latent (two image-sized buffers fewer in the plan) and the output is the one with
    the pixels carried, bit for bit (LFIM at gains 0 returns the latent unchanged)."""
    import dataclasses

    from jsr.methods.restorer import load_restorer

    r = load_restorer("tiny")
    assert r.uses_image and r.method == "osediff"
    x = np.random.default_rng(3).random((1, 64, 96, 3), np.float32)
    off, on = RestoreOptions(), RestoreOptions(knobs={"lfim_high": 0.5})
    assert not r._with_image(off) and r._with_image(on)
    seen: list[int] = []
    step = r.latent
    r.latent = lambda z, *a: (seen.append(z.shape[-1]), step(z, *a))[1]
    carried = dataclasses.replace(r, needs_image=None)  # the old behaviour: pixels always carried
    assert carried._with_image(off)
    np.testing.assert_array_equal(r(x, off), carried(x, off))
    assert seen == [4, 4 + 192]  # the latent alone, then with the 8x8x3 pixels under each latent
    assert not np.array_equal(r(x, on), r(x, off))  # and a gain on still reaches LFIM through the pixels
