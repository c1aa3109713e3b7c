"""evaluate.py and jsr.eval: dataset specs and their errors, on-the-fly degradation, compare folders (with a
stand-in restorer), evaluate.py end to end on the embedded tiny random SD model with a CTSR control LoRA and
random-weight LPIPS / DISTS / Inception / NIQE: tables, plot and samples, and the JSON's numbers against direct
computations; and the message evaluate.py prints for a control the model ignores."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jsr.metrics import DISTS, LPIPS, dists_distance, lpips_distance, psnr, ssim
from jsr.metrics import dists as dists_lib
from jsr.metrics import fid as fid_lib
from jsr.metrics import lpips as lpips_lib
from jsr.metrics import niqe as niqe_lib
from jsr.metrics.inception import FIDInceptionV3, load_inception_params, save_inception_weights
import jsr.eval as ev
from jsr.models.common import abstract_params
from jsr.sr import infer
from tests.helpers import standin_restorer

REPO = Path(__file__).resolve().parents[1]


def _smooth(seed, h, w):
    """Smooth random colour image [h, w, 3] in [0, 1] (8-bit valued): structure for NIQE and the metrics."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(size=(h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    big = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(np.round(big + noise), 0, 255) / 255.0


def _png(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def _pairs(root, sizes, lq_suffix="", hq_suffix=""):
    """Paired folders root/LQ, root/HQ: HQ [4h, 4w] smooth images and LQ their bicubic /4."""
    for k, (name, h, w) in enumerate(sizes):
        hq = _smooth(k, 4 * h, 4 * w)
        lq = np.asarray(Image.fromarray(np.round(hq * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)) / 255.0
        _png(root / "HQ" / f"{name}{hq_suffix}.png", hq)
        _png(root / "LQ" / f"{name}{lq_suffix}.png", lq)
    return root / "LQ", root / "HQ"


# ---------------------------------------------------------------------------------------------------------------
# Specs, datasets, errors (no model)


def test_parse_dataset():
    s = ev.parse_dataset("RealSR:lq=/d/LR,hq=/d/HR,strip=_(LR\\d*|HR)$")
    assert (s.name, s.lq, s.hq, s.strip, s.paired) == ("RealSR", "/d/LR", "/d/HR", "_(LR\\d*|HR)$", True)
    s = ev.parse_dataset("DIV2K-Val: hq=/d/div2k , crop=512, seed=3, degradation=pisa")
    assert (s.hq, s.crop, s.seed, s.degradation, s.paired) == ("/d/div2k", 512, 3, "pisa", False)
    assert ev.parse_dataset("D:lq=/d/LR,hq=/d/HR,crop=512").crop == 512  # paired: the aligned 128/512 crops
    for bad, msg in (("noname", "want NAME"), ("X:lq=/a", "hq=<folder> is required"), ("X:hq=/a,size=3", "bad item"),
                     ("X:hq=/a,seed=one", "integer"), ("X:hq=/a,lq=/b,seed=1", "HQ-only"),
                     ("X:hq=/a,hq=/b", "given twice"), ("X:hq=/a,strip=(", "regular expression")):
        with pytest.raises(ValueError, match=msg):
            ev.parse_dataset(bad)
    assert ev.parse_compare("StableSR=/r/{dataset}/sr") == ("StableSR", "/r/{dataset}/sr")
    with pytest.raises(ValueError, match="LABEL=DIR"):
        ev.parse_compare("/r/sr")


def test_t_label():
    assert [ev.t_label(t) for t in (None, 0.0, 0.2, 1.0, 0.25)] == ["", "0.0", "0.2", "1.0", "0.25"]
    # Values that differ past 6 digits keep distinct labels (and output folders).
    assert ev.t_label(0.1234567) != ev.t_label(0.1234568)


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.EvalDataset(ev.parse_dataset(f"X:hq={tmp_path / 'none'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ev.EvalDataset(ev.parse_dataset(f"X:hq={tmp_path / 'empty'}"))
    lq, hq = _pairs(tmp_path / "p", [("a", 4, 4), ("b", 4, 4)], lq_suffix="_LR4", hq_suffix="_HR")
    with pytest.raises(ValueError, match="do not match by file stem.*a_LR4"):
        ev.EvalDataset(ev.parse_dataset(f"X:lq={lq},hq={hq}"))
    ds = ev.EvalDataset(ev.parse_dataset(f"X:lq={lq},hq={hq},strip=_(LR\\d*|HR)$"))
    assert ds.names == ["a", "b"] and ds[1].lq.shape == (4, 4, 3) and ds[1].hq.shape == (16, 16, 3)
    assert len(ev.EvalDataset(ds.spec, max_images=1)) == 1
    with pytest.raises(ValueError, match="scale 4, the evaluation upscales by 2"):
        ev.EvalDataset(ev.parse_dataset(f"X:hq={hq}"), scale=2)
    with pytest.raises(ValueError, match=r"2 pair\(s\) where HQ is not x3 the LQ: \['a \(LQ 4x4, HQ 16x16\)'"):
        ev.check_inputs([ds], upscale=3)
    with pytest.raises(ValueError, match="unique"):
        ev.check_inputs([ds, ds])
    with pytest.raises(ValueError, match="degraded by x4, the evaluation upscales by x2"):  # before any model runs
        ev.check_inputs([ev.EvalDataset(ev.parse_dataset(f"Y:hq={hq}"))], upscale=2)


def test_cli_reports_bad_input_before_loading_a_model(tmp_path):
    lq, hq = _pairs(tmp_path / "p", [("a", 4, 4)])
    for args, msg in (([f"--dataset=X:hq={tmp_path / 'none'}"], "HQ folder .* does not exist"),
                      ([f"--dataset=X:lq={lq},hq={hq}", "--no_model"], "--no_model needs --compare"),
                      ([f"--dataset=X:lq={lq},hq={hq}", "--compare=B=/nonexistent/{dataset}"],
                       "compare B: folder '/nonexistent/X'"),
                      ([f"--dataset=X:lq={lq},hq={hq}", "--t="], "--t: no values given"),
                      (["--dataset=tfds:realsr", f"--tfds_data_dir={tmp_path / 'tfds'}"],  # not prepared there
                       r"'realsr' is not prepared in .*tfds.*build realsr|dataset RealSR: .*jsr\[tfds\]")):
        proc = subprocess.run([sys.executable, "evaluate.py", f"--out={tmp_path / 'o'}"] + args, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and re.search("error: .*" + msg, proc.stderr), proc.stderr[-2000:]


def test_degraded_dataset_is_fixed_by_seed_and_name(tmp_path):
    hq = tmp_path / "hq"
    for k, name in enumerate(("x", "y")):
        _png(hq / f"{name}.png", _smooth(k, 72, 90))
    ds = ev.EvalDataset(ev.parse_dataset(f"D:hq={hq},crop=64,seed=5"))
    a, b = ds[0], ev.EvalDataset(ds.spec)[0]
    assert a.hq.shape == (64, 64, 3) and a.lq.shape == (16, 16, 3) and a.lq_path is None
    np.testing.assert_array_equal(a.lq, b.lq)  # same seed and name: the same LQ on every run
    np.testing.assert_allclose(a.lq * 255, np.round(a.lq * 255), atol=1e-4)  # 8-bit valued, as a saved LQ
    other = ev.EvalDataset(ev.parse_dataset(f"D:hq={hq},crop=64,seed=6"))[0]
    assert np.abs(other.lq - a.lq).mean() > 1e-3
    _png(hq / "a0.png", _smooth(9, 64, 64))  # a new file sorted first must not change the others' LQ
    np.testing.assert_array_equal(ev.EvalDataset(ds.spec)[1].lq, a.lq)
    uncropped = ev.EvalDataset(ev.parse_dataset(f"D:hq={hq}"))[1]
    assert uncropped.hq.shape == (72, 88, 3)  # cut to multiples of 4 for the degradation
    with pytest.raises(ValueError, match="smaller than crop=128"):
        ev.EvalDataset(ev.parse_dataset(f"D:hq={hq},crop=128"))[0]


def test_evaluate_degraded_set_with_compare_folder(tmp_path):
    hq = tmp_path / "hq"
    for k, name in enumerate(("p", "q", "r")):
        _png(hq / f"{name}.png", _smooth(k, 48, 64))
    ds = ev.EvalDataset(ev.parse_dataset(f"Syn:hq={hq},seed=1"))
    # A "baseline" computed elsewhere on the same LQ: plain bicubic, saved under the LQ names.
    base = tmp_path / "bicubic" / "Syn"
    for i in range(len(ds)):
        _png(base / f"{ds.names[i]}.png", infer.upscale_bicubic(ds[i].lq, 4))
    out = tmp_path / "out"
    report = ev.evaluate([ds], out, restorer=standin_restorer(method="ctsr"), suite=ev.MetricSuite(), t_values=[0, 0.5, 0.5, 1],
                         compare=[("Bicubic", str(tmp_path / "bicubic" / "{dataset}"))], progress=False,
                         log=lambda m: None, num_samples=2, sample_crop=32)
    assert [r["label"] for r in report["rows"]] == ["Bicubic", "CTSR (t=0.0)", "CTSR (t=0.5)", "CTSR (t=1.0)"]
    assert [c["key"] for c in report["columns"]] == ["psnr", "ssim"]
    assert set(report["skipped_metrics"]) == {"lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa"}
    assert len(report["images"]) == 12
    # The degraded inputs and cropped references are written for other methods to use.
    assert sorted(p.name for p in (out / "Syn" / "LQ").iterdir()) == ["p.png", "q.png", "r.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "Syn" / "LQ" / "p.png")),
                                  np.round(ds[0].lq * 255).astype(np.uint8))
    # Bicubic row: its PSNR is the direct PSNR of the saved baseline files.
    want = np.mean([float(psnr(np.asarray(Image.open(base / f"{n}.png"), np.float32) / 255, ds[i].hq))
                    for i, n in enumerate(ds.names)])
    assert report["rows"][0]["psnr"] == pytest.approx(want, rel=1e-6)
    assert report["rows"][0]["seconds_per_image"] is None and report["rows"][1]["seconds_per_image"] is not None
    with Image.open(out / "samples_Syn.png") as im:
        # 6 columns (LQ, Bicubic, 3 t, HQ; at least the crop wide, wider for their titles) by 2 rows of 32 px.
        assert (im.size[0] - 7 * 4) % 6 == 0 and im.size[0] >= 6 * 32 + 7 * 4 and im.size[1] == 18 + 2 * 32 + 3 * 4
    (out / "fidelity_realism.png").write_bytes(b"an earlier run's plot")
    files = ev.write_outputs(report, out)
    assert "plot" not in files and not (out / "fidelity_realism.png").exists()  # PSNR only: no realism axis
    # Re-rendering from the JSON gives the same tables.
    assert ev.markdown_tables(ev.load_report(files["json"])) == Path(files["markdown"]).read_text()

    with pytest.raises(ValueError, match="ignores t"):
        ev.evaluate([ds], out, restorer=infer.Restorer(*(lambda x: x,) * 3, knobs=()), suite=ev.MetricSuite(),
                    t_values=[0.5], progress=False)
    with pytest.raises(ValueError, match=r"ignores t, t_steps \(its knobs: none\); t and t_steps need a CTSR "
                                         r"control LoRA \(stage 2\)$"):
        ev.evaluate([ds], out, restorer=infer.Restorer(*(lambda x: x,) * 3, knobs=()), suite=ev.MetricSuite(),
                    t_values=[0.5], options=infer.RestoreOptions(knobs={"t_steps": 2}), progress=False)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\], got 1.5"):
        ev.evaluate([ds], out, restorer=standin_restorer(method="ctsr"), suite=ev.MetricSuite(), t_values=[1.5], progress=False)
    (base / "q.png").unlink()
    with pytest.raises(ValueError, match="1 of 3 images of Syn have no SR file.*q"):
        ev.evaluate([ds], out, restorer=None, suite=ev.MetricSuite(), compare=[("B", str(base))], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py end to end on the embedded tiny random SD model


def _random_weights(module, seed):
    """Random parameters for a metric network, drawn on the host from its abstract tree (no init compile): He-scaled
    kernels (activations keep their size through deep trunks), BatchNorm variances and DISTS/LPIPS weights positive
    as trained ones are."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] == "kernel":
            std = math.sqrt(2.0 / math.prod(x.shape[:-1]))
            v = rng.normal(0, std, x.shape)
            return np.abs(v) if names[0].startswith("lin") else v  # LPIPS' heads are non-negative
        if names[-1] in ("var", "scale", "alpha", "beta"):
            return rng.uniform(0.5, 1.5, x.shape)
        return rng.normal(0, 0.05, x.shape)

    return jax.tree_util.tree_map_with_path(lambda p, x: np.asarray(leaf(p, x), np.float32), abstract_params(module))


def _lora_files(root):
    """Stage-1 and control LoRAs for the embedded tiny model's UNet (shapes from its abstract parameters: no weights
    needed), factors random and non-zero so that both change the output, saved in peft format."""
    from jsr.models import lora as L
    from jsr.models.presets import preset
    from jsr.weights import save_peft_lora
    from jsr.weights.unet import unet_from_config

    unet_params = abstract_params(unet_from_config(preset("tiny")["unet"]))
    out = {}
    for name, seed in (("stage1", 1), ("control", 2)):
        lo = L.init(jax.random.key(seed), unet_params, L.LoRASpec(L.OSEDIFF_UNET_TARGETS))
        rng = np.random.default_rng(seed)
        lo = lo.replace(factors=jax.tree.map(lambda x: np.asarray(rng.normal(0, 0.05, x.shape), np.float32),
                                             lo.factors))
        out[name] = save_peft_lora(lo, root / name).parent
    return out


@pytest.fixture(scope="module")
def tiny_env():
    """Environment for evaluate.py subprocesses: the session's JSR_CACHE (conftest.py), so the embedded tiny SD
    model is written once per test session."""
    return dict(os.environ)


def test_evaluate_py_end_to_end(tmp_path, tiny_env):
    """evaluate.py (a subprocess, the real command line) on the embedded tiny random SD model with a CTSR control
    LoRA, a 2-value t sweep and a paired set of three images (two 16 -> 64 px, one 24x48 -> 96x192, so NIQE is
    defined for one image only), with every metric whose weights can be random: all tables, the plot and the
    samples come out with the right rows and columns, and the JSON's numbers equal direct computations on the
    written images.

    Tolerances: PSNR/SSIM/NIQE are the same functions on the same 8-bit images (rel 1e-6: float32 reductions in a
    jitted vs an eager call). LPIPS/DISTS: jitted vs eager float32 VGG (rel 1e-4). FID: the same features up to
    float32 differences between batch compositions (evaluate.py batches 2, the folder reader 4), which the
    ill-conditioned 3-sample covariances amplify (rel 1e-3).
    """
    data = tmp_path / "data"
    lq_dir, hq_dir = _pairs(data, [("a", 16, 16), ("b", 16, 16), ("c", 24, 48)])
    w = tmp_path / "weights"
    w.mkdir()
    lpips_lib.save_lpips_weights(_random_weights(LPIPS(), 0), w / "lpips.safetensors")
    dists_lib.save_dists_weights(_random_weights(DISTS(), 1), w / "dists.safetensors")
    save_inception_weights(_random_weights(FIDInceptionV3(), 2), w / "inception.safetensors")
    a = np.random.default_rng(3).normal(size=(36, 36))
    niqe_lib.save_niqe_params(w / "niqe.npz", niqe_lib.NIQEParams(np.random.default_rng(4).normal(size=36),
                                                                   a @ a.T / 36 + np.eye(36)))
    loras = _lora_files(tmp_path / "loras")
    out = tmp_path / "out"
    cmd = [sys.executable, "evaluate.py", "--model=", f"--lora={loras['stage1']}",
           f"--lora=control={loras['control']}", "--t=0,1", f"--dataset=Tiny:lq={lq_dir},hq={hq_dir}",
           f"--lpips={w / 'lpips.safetensors'}", f"--dists={w / 'dists.safetensors'}",
           f"--fid_inception={w / 'inception.safetensors'}", f"--niqe={w / 'niqe.npz'}", "--pyiqa=none",
           "--fid_batch=2", "--fid_dims=64", f"--out={out}", "--noprogress"]
    proc = subprocess.run(cmd, cwd=REPO, env=tiny_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    keys = ["psnr", "ssim", "lpips", "dists", "fid", "niqe"]
    headers = ["PSNR↑", "SSIM↑", "LPIPS↓", "DISTS↓", "FID↓", "NIQE↓"]
    report = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in report["columns"]] == keys
    assert set(report["skipped_metrics"]) == {"musiq", "maniqa", "clipiqa"}
    rows = report["rows"]
    assert [(r["dataset"], r["label"], r["t"], r["n"]) for r in rows] == [("Tiny", "CTSR (t=0.0)", 0.0, 3),
                                                                          ("Tiny", "CTSR (t=1.0)", 1.0, 3)]
    assert all(isinstance(r[k], float) for r in rows for k in keys)
    assert rows[0]["psnr"] != rows[1]["psnr"]  # the control t moves the output
    assert "2 of 3 images NaN" in rows[0]["notes"]["niqe"]

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["Datasets", "Method", "t", "N"] + headers + ["seconds/image"]
    assert [r[:4] for r in table[1:]] == [["Tiny", "CTSR", "0.0", "3"], ["Tiny", "CTSR", "1.0", "3"]]
    assert float(table[2][4]) == pytest.approx(rows[1]["psnr"], rel=1e-12)

    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| Datasets | Method | " + " | ".join(headers) + " |" in md
    assert "| Timestep t | " + " | ".join(headers) + " |" in md
    sweep = md.split("Table 10 layout")[1]
    assert "\n| 0.0 | " in sweep and "\n| 1.0 | " in sweep
    assert "| Tiny | CTSR (t=0.0) | " in md and "|  | CTSR (t=1.0) | " in md
    assert "MUSIQ: pyiqa metrics disabled" in md

    with Image.open(out / "fidelity_realism.png") as im:  # two panels: PSNR vs LPIPS, PSNR vs DISTS
        assert im.format == "PNG" and im.size[0] > 1.8 * im.size[1]
    with Image.open(out / "samples_Tiny.png") as im:  # LQ | t=0 | t=1 | HQ, rows 64, 64 and 96 px high
        assert (im.size[0] - 5 * 4) % 4 == 0 and im.size[0] >= 4 * 192 + 5 * 4 and im.size[1] == 18 + 224 + 4 * 4

    images = {(r["name"], r["t"]): r for r in report["images"]}
    assert sorted(images) == [(n, t) for n in "abc" for t in (0.0, 1.0)]
    # Timing: the first call at each input size compiles; every other call is timed.
    assert [images[(n, 0.0)]["includes_compile"] for n in "abc"] == [True, False, True]
    assert not any(images[(n, 1.0)]["includes_compile"] for n in "abc")
    assert report["timing"]["timed_calls"] == 4 and report["timing"]["first_call_seconds"] > 0
    assert rows[1]["seconds_per_image"] == pytest.approx(np.mean([images[(n, 1.0)]["seconds"] for n in "abc"]))

    # Direct computation for one image (c at t=1) from the files on disk.
    row = images[("c", 1.0)]
    sr_path = Path(row["sr_path"])
    assert sr_path == out / "Tiny" / "CTSR" / "t1.0" / "c.png"
    sr = np.asarray(Image.open(sr_path), np.float32) / 255
    hq = np.asarray(Image.open(hq_dir / "c.png"), np.float32) / 255
    assert sr.shape == hq.shape == (96, 192, 3)
    assert row["psnr"] == pytest.approx(float(psnr(sr, hq)), rel=1e-6)
    assert row["ssim"] == pytest.approx(float(ssim(sr, hq)), rel=1e-6)
    lp = lpips_lib.load_lpips_params(w / "lpips.safetensors")
    assert row["lpips"] == pytest.approx(float(lpips_distance(lp, sr, hq)), rel=1e-4)
    dp = dists_lib.load_dists_params(w / "dists.safetensors")
    assert row["dists"] == pytest.approx(float(dists_distance(dp, hq, sr)), rel=1e-4)
    assert row["niqe"] == pytest.approx(float(niqe_lib.niqe(sr, niqe_lib.load_niqe_params(w / "niqe.npz"))),
                                        rel=1e-6)
    assert images[("a", 1.0)]["niqe"] is None  # 64 x 64: fewer than two 96 x 96 blocks
    # The row means are the means of the image rows; FID is the folders' FID.
    assert rows[1]["lpips"] == pytest.approx(np.mean([images[(n, 1.0)]["lpips"] for n in "abc"]), rel=1e-12)
    assert rows[1]["niqe"] == pytest.approx(row["niqe"], rel=1e-12)
    fid = fid_lib.fid_from_folders(hq_dir, sr_path.parent, load_inception_params(w / "inception.safetensors"),
                                   batch_size=4, dims=64)
    assert rows[1]["fid"] == pytest.approx(fid, rel=1e-3)


def test_evaluate_py_refuses_controls_the_model_ignores(tmp_path, tiny_env):
    """The message evaluate.py users see for a control the model ignores names the control and what it needs, not
    another command line's flag; --t_steps alone
    (no --t) is refused the same way, as an error before any image is restored, not a traceback."""
    lq, hq = _pairs(tmp_path / "p", [("a", 4, 4)])
    from jsr.methods.lfim_knobs import LFIM_KNOB_NAMES  # an OSEDiff model's only knobs: FiDeSR's LFIM

    have = ", ".join(LFIM_KNOB_NAMES)
    for arg, msg in (("--t=0.5", f"error: osediff model ignores t (its knobs: {have}); t needs a CTSR control "
                                 "LoRA (stage 2)\n"),
                     ("--t_steps=2", f"error: osediff model ignores t_steps (its knobs: {have}); t_steps needs a "
                                     "CTSR control LoRA (stage 2)\n")):
        proc = subprocess.run([sys.executable, "evaluate.py", "--model=", f"--dataset=X:lq={lq},hq={hq}", arg,
                               f"--out={tmp_path / 'o'}", "--pyiqa=none", "--noprogress"], cwd=REPO, env=tiny_env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "--control-lora" not in proc.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written
