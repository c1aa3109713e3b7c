"""Restoration over several devices (jsr.sr.data_parallel): the embedded tiny random SD model restores the same
images on 4 of the session's fake CPU devices (conftest.py: 8) as on one, through the restorer,
``python -m jsr.infer --devices 4`` (5 images: a batch of 4 and one padded to 4) and jsr.eval's tables.

Tolerance: each device runs, under ``shard_map``, the program one device runs on its rows; with one image (or one
tile) per device that is the one-device program at batch 1. Under XLA's default CPU preset the floats were
identical (2-core CPU, 2026-11-30); under the fast-compile preset jsr now uses on CPU (jsr.cli.CPU_FAST_COMPILE)
the per-device program is compiled with other fusions and differs by float32 round-off (max 2.5e-6 on images in
[0, 1], one 8-bit level on 1 of 4,608 PNG values, PSNR within 7e-5 dB). Hence ``atol=1e-5`` on floats, one level
on PNGs and ``rel=1e-4`` or ``abs=1e-4`` on metrics (an SSIM near 0 once moved 9e-6): far below any real
difference (a wrong row order or a padded row leaking into an output moves values by ~0.1). The comparisons keep
one image or tile per device.
"""

import jax
import numpy as np
import pytest
from PIL import Image

import jsr.eval as ev
from jsr import infer as cli
from jsr.methods.restorer import load_restorer
from jsr.sr import infer
from jsr.sr.base import load_base
from jsr.sr.data_parallel import DataParallel, select_devices

N_DEV = 4


def _images(n, h=8, w=12, seed=0):
    """``n`` random LQ images [h, w, 3] in [0, 1], 8-bit valued (what a PNG holds)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3)).astype(np.float32) / 255.0 for _ in range(n)]


@pytest.fixture(scope="module")
def restorers():
    """The tiny model's OSEDiff restorer (random LoRA-free base) on one device and on 4."""
    if jax.local_device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (conftest.py forces 8 CPU devices)")
    base = load_base("")
    return (load_restorer(base, None, method="osediff"),
            load_restorer(base, None, method="osediff", devices=jax.local_devices()[:N_DEV]))


def test_select_devices():
    local = jax.local_devices()
    assert select_devices("auto") == local[:1]  # CPU: one device unless asked
    assert select_devices("all") == local and select_devices(2) == local[:2] and select_devices(" 1 ") == local[:1]
    with pytest.raises(ValueError, match=r"--devices=99: this process has \d+ cpu device"):
        select_devices("99")
    with pytest.raises(ValueError, match="want auto, all or a device count"):
        select_devices("gpu")


def test_data_parallel_pads_and_drops():
    """5 rows on 4 devices: padded to 8 by repeating the last, each device sees 2, the output is cut to 5; a
    ``None`` batched argument and a replicated one pass through."""
    dp = DataParallel(jax.local_devices()[:N_DEV])
    seen = []

    def fn(w, x, none):
        seen.append(x.shape)  # traced once: the per-device shape
        return {"y": x * w, "rows": jax.numpy.full((x.shape[0],), jax.lax.axis_index("data"))}

    f = dp.map(fn, batched=(False, True, True))
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    out = f(dp.replicate(np.float32(2.0)), x, None)
    np.testing.assert_array_equal(out["y"], 2 * x)
    assert seen == [(2, 3)] and out["rows"].tolist() == [0, 0, 1, 1, 2]


def test_restorer_on_4_devices_equals_1(restorers):
    r1, r4 = restorers
    assert (r1.devices, r4.devices) == (1, N_DEV)
    ups = np.stack([infer.upscale_bicubic(im, 4) for im in _images(5)])
    opts = infer.RestoreOptions(color_fix="none")
    singles = np.concatenate([r1(ups[i:i + 1], opts) for i in range(5)])
    np.testing.assert_allclose(r4(ups[:4], opts), singles[:4], rtol=0, atol=1e-5)  # one image per device
    np.testing.assert_allclose(r4(ups[4:], opts), singles[4:], rtol=0, atol=1e-5)  # one padded to 4 devices


@pytest.mark.slow  # ~40 s more on the 2-core CPU: the staged VAE's stage programs and the tile programs, twice
def test_tiles_on_4_devices_equal_1(restorers):
    """Latent tiles (4 per call: ``tiles_per_call`` 1 rounded up to the devices) and the staged VAE's windows
    split over 4 devices equal the one-device tiled run."""
    r1, r4 = restorers
    tiled = infer.RestoreOptions(color_fix="none", latent_tile=8, latent_overlap=4, vae_tile=64, vae_overlap=16)
    assert r4.device_options(tiled).tiles_per_call == N_DEV
    big = infer.upscale_bicubic(_images(1, 16, 24, seed=1)[0], 4)[None]
    plan = r4.plan_input(big.shape, tiled)
    assert (plan.encode, plan.decode) == ("staged", "staged")
    np.testing.assert_allclose(r4(big, tiled), r1(big, tiled), rtol=0, atol=1e-5)


def test_cli_devices_flag(restorers, tmp_path, capsys):
    """``--devices 4`` on 5 same-size files: batches of 4 (the default batch is one image per device), the fifth
    padded; every output equals the one-device restorer's, and the log says how many devices ran."""
    r1, _ = restorers
    src = tmp_path / "in"
    src.mkdir()
    lqs = _images(5, seed=2)
    for i, im in enumerate(lqs):
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(src / f"im{i}.png")
    assert cli.main([str(src), "--model", "tiny", "--method", "osediff", "--devices", str(N_DEV), "-o",
                     str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"restoring on {N_DEV} cpu devices" in err and "restored 5 image(s)" in err
    for i in range(len(lqs)):
        want = r1(infer.upscale_bicubic(cli.read_image(src / f"im{i}.png"), 4)[None])[0]  # k * float32(1/255)
        got = np.asarray(Image.open(tmp_path / "out" / f"im{i}_sr.png"))
        want8 = np.round(np.clip(want, 0, 1) * 255).astype(np.int16)
        assert np.abs(got.astype(np.int16) - want8).max() <= 1  # 8-bit rounding of a round-off difference
    assert cli.main([str(src), "--model", "tiny", "--devices", "99", "--no-progress"]) == 2
    assert "error: --devices=99: this process has" in capsys.readouterr().err


def test_evaluate_tables_on_4_devices_equal_1(restorers, tmp_path):
    """jsr.eval on 5 paired images (4 per call + 1 padded): every image row's metrics and the tables equal the
    one-device run's (the timing aside)."""
    r1, r4 = restorers
    hq_dir, lq_dir = tmp_path / "HQ", tmp_path / "LQ"
    for d in (hq_dir, lq_dir):
        d.mkdir()
    for i, im in enumerate(_images(5, seed=3)):
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(lq_dir / f"p{i}.png")
        hq = np.round(infer.upscale_bicubic(im, 4) * 255).astype(np.uint8)
        Image.fromarray(hq).save(hq_dir / f"p{i}.png")
    ds = ev.EvalDataset(ev.parse_dataset(f"Pairs:lq={lq_dir},hq={hq_dir}"))
    reports = [ev.evaluate([ds], tmp_path / f"out{r.devices}", restorer=r, suite=ev.MetricSuite(),
                           progress=False, log=lambda m: None, num_samples=0) for r in (r1, r4)]
    one, four = reports
    assert (one["timing"]["devices"], four["timing"]["devices"], four["timing"]["images_per_call"]) == (1, 4, 4)
    drop = ("seconds", "includes_compile", "sr_path", "seconds_per_image")

    def rows(report, key):
        return [{k: (pytest.approx(v, rel=1e-4, abs=1e-4) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in drop} for r in report[key]]

    assert [{k: v for k, v in r.items() if k not in drop} for r in four["images"]] == rows(one, "images")
    assert [{k: v for k, v in r.items() if k not in drop} for r in four["rows"]] == rows(one, "rows")
    tables = [ev.markdown_tables(r).split("## Timing")[0] for r in reports]
    heads = [[line for line in t.splitlines() if line.startswith("|")][:2] for t in tables]
    assert heads[0] == heads[1] and heads[0]  # the same columns (the values: the rows above)
    # The images of a 4-device call share its seconds; a new batch shape (4, then 1 padded) compiles.
    assert [r["includes_compile"] for r in four["images"]] == [True] * 4 + [True]
    assert len({r["seconds"] for r in four["images"][:4]}) == 1
