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
    # The spill needs ~11 GB free where the carries go: pin the disk so the plan does not depend on the machine
    # (CI's temporary folder once had less, and planned blended tiles here).
    monkeypatch.setattr(infer, "_free_disk", lambda folder: 1000 * GB)
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


def test_small_images_are_never_tiled_and_a_large_budget_keeps_carries_in_memory(sd21_restorer, monkeypatch):
    r = sd21_restorer
    monkeypatch.setattr(infer, "_free_disk", lambda folder: 1000 * GB)  # room to spill on any machine
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
    programs and the latent step and counts XLA's temporaries; the run then reuses those programs (none of them
    is lowered again) and gives the same image as a restorer that planned without them. Tiny model, a 192x128
    image in 64-px VAE tiles and 10-latent UNet tiles (a call shape no other test compiles)."""
    import jax.monitoring

    from jsr.methods.restorer import load_restorer

    lowered: list[str] = []

    def listen(event, seconds, fun_name="", **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        opts = RestoreOptions(vae_tile=64, vae_overlap=16, latent_tile=10, latent_overlap=2)
        x = np.random.default_rng(0).random((1, 128, 192, 3), np.float32)
        measured = load_restorer("tiny")
        measured.plan_temporaries = True
        plan = measured.plan(x.shape, opts)
        assert (plan.encode, plan.decode) == ("staged", "staged")
        assert plan.temporaries > 0 and plan.latent_temporaries > 0
        assert "MB of XLA temporaries" in plan.describe()
        # Names of the programs planning compiled: the stages' ("call") and the method's forward ("step").
        assert lowered.count("jit(call)") == len(measured.tiled_vae._encoder.stages) + len(
            measured.tiled_vae._decoder.stages) and lowered.count("jit(step)") == 1
        lowered.clear()
        got = measured(x, opts)
        assert "jit(call)" not in lowered and "jit(step)" not in lowered, lowered
        plain = load_restorer("tiny")
        if jax.default_backend() == "cpu":  # the working memory is host memory here
            assert plan.host > plain.plan(x.shape, opts).host
        np.testing.assert_array_equal(got, plain(x, opts))
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


def test_a_device_budget_shrinks_tiles_per_call_then_the_vae_tile(sd21_restorer):
    """Under ``max_device_memory`` the plan first batches fewer tiles per call, then cuts the VAE tile by quarters
    until one call's carries and the whole-image arrays it reads fit (SD-2.1's VAE, shapes only), and says so;
    a budget nothing fits stops at the smallest tiles and says it is over."""
    import dataclasses

    r = dataclasses.replace(sd21_restorer)
    shape = (1, 2048, 2048, 3)
    free = r.plan(shape, RestoreOptions(tiles_per_call=4))
    assert free.tiles == (1024, 176, 96, 32, 4) and free.device_budget == 0
    need = r._device_needs(shape, RestoreOptions(tiles_per_call=4), 1 << 60, {})[0]
    one = r._device_needs(shape, RestoreOptions(), 1 << 60, {})[0]
    assert need > one > GB  # 4 windows of 1024 px at 128-512 channels, then one
    fewer = r.plan(shape, RestoreOptions(tiles_per_call=4, max_device_memory=(need + one) // 2))
    assert fewer.tiles == (1024, 176, 96, 32, 1) and fewer.device <= fewer.device_budget
    assert "tiles per call 4 -> 1" in fewer.describe()
    budget = one // 2
    small = r.plan(shape, RestoreOptions(max_device_memory=budget))
    assert small.tiles[0] < 1024 and small.tiles[1:] == (176, 96, 32, 1)
    seq = [1024]
    while seq[-1] > 128:
        seq.append(max(128, seq[-1] * 3 // 4 // 64 * 64))
    prev = seq[seq.index(small.tiles[0]) - 1]  # the last tile tried before: over the budget
    assert small.device <= budget < r._device_needs(
        shape, RestoreOptions(vae_tile=prev, vae_overlap=min(176, prev // 2 // 8 * 8)), 1 << 60, {})[0]
    line = small.describe()
    assert f"VAE tile 1024 -> {small.tiles[0]}" in line and "device budget" in line and "over it" not in line
    assert small.steps > free.steps  # more, smaller windows
    assert small.options(RestoreOptions()).vae_tile == small.tiles[0]
    # 64 KB: the VAE stops at its floor (128 px, overlap 64); the latent calls (4 + 4 channels of float32 in and
    # out, no temporaries known here) shrink by quarters until they fit: 96 -> 72 -> 48 -> 32, overlap scaled.
    nothing = r.plan(shape, RestoreOptions(max_device_memory=2 ** 16))
    assert nothing.tiles == (128, 64, 32, 32 * 32 // 96, 1)
    assert "over it even at the smallest tiles" in nothing.describe() and "UNet tile 96 -> 32" in nothing.describe()


def test_measured_temporaries_count_and_clear_misses_are_not_compiled(sd21_restorer):
    """With plan_temporaries the fit adds XLA's temporaries to the carries; a measurement scaled by window area
    skips compiling tiles that clearly cannot fit. The measuring functions are stand-ins here (the real ones
    compile; test_plans_with_temporaries_compile_the_stages_once runs them)."""
    import dataclasses

    r = dataclasses.replace(sd21_restorer, plan_temporaries=True)
    measured: list[int] = []

    def temps(shape, tile, overlap, tiles_per_call=1):
        measured.append(tile)
        return 3 * min(tile, 1024) ** 2 * 1024  # 3 KB per window pixel (at the encoder's tile)

    vae = r.tiled_vae
    orig = vae.encode_temporaries, vae.decode_temporaries
    try:
        vae.encode_temporaries = temps
        vae.decode_temporaries = lambda shape, tile, overlap, tiles_per_call=1: temps(shape, tile * 8, overlap)
        shape = (1, 2048, 2048, 3)
        need = r._device_needs(shape, RestoreOptions(vae_tile=576), 1 << 60, {})[0]
        carries = dataclasses.replace(r, plan_temporaries=False)._device_needs(
            shape, RestoreOptions(vae_tile=576), 1 << 60, {})[0]
        assert need == carries + 3 * 576 ** 2 * 1024
        measured.clear()
        plan = r.plan(shape, RestoreOptions(max_device_memory=need))
        assert plan.tiles[0] == 576 and plan.device == need  # 1024 -> 768 -> 576 (quarters, multiples of 64)
        # 1024's carries alone are over the budget: its programs are never compiled; 768 and 576 are measured.
        assert list(dict.fromkeys(measured)) == [768, 576]
        # A measurement scaled by window area that is clearly over (> 1.25 x the budget) is not compiled again.
        measured.clear()
        window = 576 * 576
        guess = {"vae": (window, 4 * need)}  # as if 576 px had needed 4x the budget in temporaries
        got = r._device_needs(shape, RestoreOptions(vae_tile=576), need, guess)[0]
        assert measured == [] and got == carries + 4 * need
    finally:
        vae.encode_temporaries, vae.decode_temporaries = orig


def test_the_run_uses_the_tiles_the_budget_chose():
    """A stand-in restorer under a device budget that its 24-latent tiles do not fit: the plan shrinks the latent
    tile and the run gives exactly what asking for that tile gives."""
    import dataclasses

    from tests.helpers import standin_restorer

    r = standin_restorer()
    x = np.random.default_rng(1).random((1, 192, 256, 3), np.float32)
    base = RestoreOptions(vae_tile=0, latent_tile=24, latent_overlap=8)
    call_bytes = 24 * 24 * 8 * 4  # 4 channels in, 4 out, float32
    plan = r.plan(x.shape, dataclasses.replace(base, max_device_memory=call_bytes - 1))
    assert plan.tiles[2:4] == (16, 5)
    got = r(x, dataclasses.replace(base, max_device_memory=call_bytes - 1))
    want = r(x, dataclasses.replace(base, latent_tile=plan.tiles[2], latent_overlap=plan.tiles[3]))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, r(x, base))


def test_the_device_budget_defaults_to_the_devices_free_memory(monkeypatch):
    class Dev:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 10 * GB, "bytes_in_use": 4 * GB}

    assert infer.device_free_memory(Dev()) == int(0.9 * 6 * GB)
    Dev.memory_stats = lambda self: None
    assert infer.device_free_memory(Dev()) == 0
    assert infer.device_free_memory(jax.devices("cpu")[0]) == 0
    from tests.helpers import standin_restorer

    r = standin_restorer()
    monkeypatch.setattr(infer, "device_free_memory", lambda device=None: 123)
    assert r.device_budget(RestoreOptions()) == 123 and r.device_budget(RestoreOptions(max_device_memory=7)) == 7
    with pytest.raises(ValueError, match="max_device_memory"):
        RestoreOptions(max_device_memory=-1)


def test_a_device_budget_counts_the_untiled_vae_programs_of_small_images():
    """An image that fits one VAE tile runs the untiled encode/decode programs: under a device budget (with
    plan_temporaries) their XLA temporaries count, and a budget below them tiles the VAE instead."""
    from jsr.methods.restorer import load_restorer

    r = load_restorer("tiny")
    r.plan_temporaries = True
    shape = (1, 256, 256, 3)
    whole = r.whole_memory(shape)
    assert whole > 0
    roomy = r.plan(shape, RestoreOptions(max_device_memory=64 * GB))
    assert (roomy.encode, roomy.decode, roomy.fitted) == ("whole", "whole", "") and roomy.device >= whole
    tight = r.plan(shape, RestoreOptions(max_device_memory=whole // 2))
    assert tight.tiles[0] < 256 and "staged" in (tight.encode, tight.decode), tight.describe()
